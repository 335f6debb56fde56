//! Class names: the label lists embedded from `models/`, and which one a model gets.

use std::collections::HashMap;

use super::{embedded_file, Source};

/// The label list of models that name none (not from the registry): ILSVRC2012's 1000 classes.
const IMAGENET: &str = "imagenet_classes.txt";

/// Class names, one per logit index, and their WordNet ids where the list gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    names: Vec<String>,
    /// `n01440764`-style ids, one per class, when every line of the list starts with one.
    ids: Option<Vec<String>>,
    /// Each id's class index (an id given twice keeps its first).
    index: HashMap<String, usize>,
}

/// A label list that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    /// No class is named.
    #[error("the label list names no class")]
    Empty,
    /// Some lines start with a WordNet id and others do not.
    #[error(
        "line {line}: {found:?} has no WordNet id, as earlier lines do (every line is either \
         `LABEL` or `WNID LABEL`)"
    )]
    MixedIds {
        /// 1-based line number.
        line: usize,
        /// The line.
        found: String,
    },
}

/// True for a WordNet noun id: `n` and eight digits (`n01440764`).
fn is_wordnet_id(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 9 && b[0] == b'n' && b[1..].iter().all(u8::is_ascii_digit)
}

impl Labels {
    /// The 1000 ILSVRC2012 classes in the standard index order (281 = "tabby, tabby cat",
    /// `n02123045`), with their WordNet ids.
    pub fn imagenet() -> Self {
        Self::embedded(IMAGENET).unwrap_or_else(|| Self {
            names: Vec::new(),
            ids: None,
            index: HashMap::new(),
        })
    }

    /// The list in `models/<file>` (see [`Labels::parse`]).
    pub fn embedded(file: &str) -> Option<Self> {
        embedded_file(file).and_then(|text| Self::parse(text).ok())
    }

    /// A label list: one class per non-blank line, in logit order, each line either `LABEL` or
    /// `WNID LABEL` (a WordNet id, a space, the name; every line the same way). Surrounding
    /// blanks are trimmed.
    pub fn parse(text: &str) -> Result<Self, LabelsError> {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        let with_id = |l: &str| {
            l.split_once(char::is_whitespace)
                .filter(|(id, name)| is_wordnet_id(id) && !name.trim().is_empty())
                .map(|(id, name)| (id.to_string(), name.trim().to_string()))
        };
        let Some(&(_, first)) = lines.first() else {
            return Err(LabelsError::Empty);
        };
        if with_id(first).is_none() {
            return Ok(Self {
                names: lines.iter().map(|(_, l)| l.to_string()).collect(),
                ids: None,
                index: HashMap::new(),
            });
        }
        let (mut names, mut ids) = (Vec::new(), Vec::new());
        for &(line, l) in &lines {
            let (id, name) = with_id(l).ok_or_else(|| LabelsError::MixedIds {
                line,
                found: l.to_string(),
            })?;
            ids.push(id);
            names.push(name);
        }
        let mut index = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            index.entry(id.clone()).or_insert(i);
        }
        Ok(Self {
            names,
            ids: Some(ids),
            index,
        })
    }

    /// The class names of a model from `source` with `classes` outputs: a registry model's own
    /// list (its entry's `labels` file), any other model's the ImageNet list; in both cases only
    /// if the list has exactly `classes` names. `None`: labels are reported as null.
    pub fn for_model(source: &Source, classes: usize) -> Option<Self> {
        let list = match source {
            Source::Registry(entry) => Self::embedded(&entry.labels)?,
            Source::Url(_) | Source::File(_) => Self::imagenet(),
        };
        (list.len() == classes).then_some(list)
    }

    /// Number of classes named.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no class is named.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of class `index`.
    pub fn get(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    /// The WordNet id of class `index`, when the list gives ids.
    pub fn id(&self, index: usize) -> Option<&str> {
        self.ids.as_ref()?.get(index).map(String::as_str)
    }

    /// The WordNet ids, one per class, when the list gives them.
    pub fn ids(&self) -> Option<&[String]> {
        self.ids.as_deref()
    }

    /// The class whose WordNet id is `id`.
    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::registry::Registry;

    #[test]
    fn imagenet_labels_are_in_ilsvrc_order_with_their_wordnet_ids() {
        let l = Labels::imagenet();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.get(0), Some("tench, Tinca tinca"));
        assert_eq!(l.id(0), Some("n01440764"));
        assert_eq!(l.get(281), Some("tabby, tabby cat"));
        assert_eq!(l.id(281), Some("n02123045"));
        assert_eq!(
            l.get(999),
            Some("toilet tissue, toilet paper, bathroom tissue")
        );
        assert_eq!(l.id(999), Some("n15075141"));
        // The standard index order is the ids' sorted order.
        let ids = l.ids().unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn label_lists_parse_with_or_without_ids_and_refuse_a_mix() {
        let plain = Labels::parse("cat\n\n  dog  \nn0 bird\n").unwrap();
        assert_eq!(
            (plain.len(), plain.get(1), plain.get(2)),
            (3, Some("dog"), Some("n0 bird"))
        );
        assert_eq!(plain.id(0), None);
        let ids = Labels::parse("n01440764 tench, Tinca tinca\r\nn01443537\tgoldfish\n").unwrap();
        assert_eq!(ids.get(1), Some("goldfish"));
        assert_eq!(ids.id(1), Some("n01443537"));
        let e = Labels::parse("n01440764 tench\ngoldfish\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(matches!(Labels::parse(" \n"), Err(LabelsError::Empty)));
    }

    #[test]
    fn a_model_gets_its_entrys_list_or_imagenet_when_the_count_matches() {
        let registry = Registry::builtin().unwrap();
        let mut entry = registry.get("diracnet18").unwrap().clone();
        let registered = Source::Registry(entry.clone());
        assert_eq!(
            Labels::for_model(&registered, 1000),
            Some(Labels::imagenet())
        );
        assert_eq!(Labels::for_model(&registered, 10), None);
        // The entry's own file decides: one that is not embedded gives no labels.
        entry.labels = "no_such_list.txt".into();
        assert_eq!(Labels::for_model(&Source::Registry(entry), 1000), None);
        let file = Source::File(PathBuf::from("mine.safetensors"));
        assert_eq!(Labels::for_model(&file, 1000), Some(Labels::imagenet()));
        assert_eq!(Labels::for_model(&file, 10), None);
    }
}
