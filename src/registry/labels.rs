//! Class names: the label lists embedded from `models/`, and which one a model gets.

use super::{embedded_file, Source};

/// The label list of models that name none (not from the registry): ILSVRC2012's 1000 classes.
const IMAGENET: &str = "imagenet_classes.txt";

/// Class names, one per logit index.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels(Vec<String>);

impl Labels {
    /// The 1000 ILSVRC2012 class names in the standard index order (281 = "tabby, tabby cat").
    pub fn imagenet() -> Self {
        Self::embedded(IMAGENET).unwrap_or_else(|| Self(Vec::new()))
    }

    /// The list in `models/<file>`: one class name per line, in logit order.
    pub fn embedded(file: &str) -> Option<Self> {
        embedded_file(file).map(Self::parse)
    }

    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        )
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
        self.0.len()
    }

    /// True when no class is named.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of class `index`.
    pub fn get(&self, index: usize) -> Option<&str> {
        self.0.get(index).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::registry::Registry;

    #[test]
    fn imagenet_labels_are_in_ilsvrc_order() {
        let l = Labels::imagenet();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.get(0), Some("tench, Tinca tinca"));
        assert_eq!(l.get(281), Some("tabby, tabby cat"));
        assert_eq!(
            l.get(999),
            Some("toilet tissue, toilet paper, bathroom tissue")
        );
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
