//! Accuracy on a labelled image set (`diracnet eval`): which class each image is (an
//! ImageFolder tree, or a flat folder and ImageNet's `LOC_val_solution.csv`), and top-1 / top-5
//! counts.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    registry::Labels,
    stream::{self, Entry},
};

/// The images of an evaluation and the class each one is.
#[derive(Debug, Default)]
pub struct Samples {
    /// The image files, in the order they run.
    pub entries: Vec<Entry>,
    /// `targets[i]` is the class index of `entries[i]`.
    pub targets: Vec<usize>,
    /// Ground-truth rows whose image is not in the folder (`--ground-truth` only).
    pub missing: usize,
    /// Images in the folder that the ground truth does not list (`--ground-truth` only).
    pub unlisted: usize,
}

/// Why an evaluation set cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder could not be read.
    #[error("reading {path}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A class folder's name, or a ground-truth class, names no class of the model.
    #[error("{what}: {name:?} {reason}")]
    UnknownClass {
        /// Where the name came from (a folder, a CSV line).
        what: String,
        /// The class name found.
        name: String,
        /// What it would have to be.
        reason: String,
    },
    /// A ground-truth line is not `ImageId,PredictionString`.
    #[error("{path}, line {line}: expected `ImageId,PredictionString` (e.g. `ILSVRC2012_val_00000001,n01751748 …`), got {found:?}")]
    BadCsvLine {
        /// The CSV file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The line.
        found: String,
    },
    /// Nothing to evaluate.
    #[error("{0}")]
    Empty(String),
}

/// The class index `name` stands for: a WordNet id of `labels` (`n01440764`), or a class index
/// below `classes` (`0`, `17`).
pub fn class_of(name: &str, labels: Option<&Labels>, classes: usize) -> Result<usize, String> {
    if let Some(i) = labels.and_then(|l| l.index_of_id(name)) {
        return Ok(i);
    }
    match name.parse::<usize>() {
        Ok(i) if i < classes => Ok(i),
        _ => {
            let ids = labels.and_then(Labels::ids).is_some();
            Err(if ids {
                format!(
                    "is neither a WordNet id of the model's labels nor a class index below {classes}"
                )
            } else {
                format!(
                    "is not a class index below {classes} (the model's labels carry no WordNet ids)"
                )
            })
        }
    }
}

/// The paths in `dir` (not sorted).
fn list(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let io = |source| EvalError::Io {
        path: dir.display().to_string(),
        source,
    };
    fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)
}

/// An ImageFolder tree: one subfolder of `dir` per class, named by its WordNet id or class
/// index ([`class_of`]), holding that class's images (walked recursively, [`stream::walk`]).
/// Classes run in folder-name order.
pub fn image_folder(
    dir: &Path,
    labels: Option<&Labels>,
    classes: usize,
) -> Result<Samples, EvalError> {
    let mut folders = list(dir)?;
    folders.retain(|p| p.is_dir());
    folders.sort();
    if folders.is_empty() {
        return Err(EvalError::Empty(format!(
            "{} has no class folders (ImageFolder layout: one folder per class, named by its \
             WordNet id or class index); for a flat folder of images give --ground-truth",
            dir.display()
        )));
    }
    let mut samples = Samples::default();
    for folder in folders {
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target =
            class_of(&name, labels, classes).map_err(|reason| EvalError::UnknownClass {
                what: format!("class folder {}", folder.display()),
                name: name.clone(),
                reason,
            })?;
        for entry in stream::walk(&[folder]) {
            samples.entries.push(entry);
            samples.targets.push(target);
        }
    }
    Ok(samples)
}

/// A flat folder of images and a ground truth in the format of ImageNet's
/// `LOC_val_solution.csv`: a header `ImageId,PredictionString`, then one line per image whose
/// class is the first word of PredictionString; the image is `ImageId.<image extension>` in
/// `dir`. Images run in file-name order.
pub fn with_ground_truth(
    dir: &Path,
    csv: &Path,
    labels: Option<&Labels>,
    classes: usize,
) -> Result<Samples, EvalError> {
    let text = fs::read_to_string(csv).map_err(|source| EvalError::Io {
        path: csv.display().to_string(),
        source,
    })?;
    let mut truth: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let bad = || EvalError::BadCsvLine {
            path: csv.display().to_string(),
            line: i + 1,
            found: line.to_string(),
        };
        let (id, prediction) = line.split_once(',').ok_or_else(bad)?;
        let class = prediction.split_whitespace().next().ok_or_else(bad)?;
        let target =
            class_of(class, labels, classes).map_err(|reason| EvalError::UnknownClass {
                what: format!("{}, line {}", csv.display(), i + 1),
                name: class.to_string(),
                reason,
            })?;
        truth.insert(id.trim().to_string(), target);
    }
    let mut files = list(dir)?;
    files.retain(|p| stream::is_image_file(p) && p.is_file());
    files.sort();
    let mut samples = Samples::default();
    let mut found = 0;
    for path in files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        match stem.and_then(|s| truth.get(&s).copied()) {
            Some(target) => {
                found += 1;
                samples.entries.push(Entry {
                    path,
                    problem: None,
                });
                samples.targets.push(target);
            }
            None => samples.unlisted += 1,
        }
    }
    samples.missing = truth.len().saturating_sub(found);
    if samples.entries.is_empty() {
        return Err(EvalError::Empty(format!(
            "no image in {} is listed in {} ({} listed, {} images found)",
            dir.display(),
            csv.display(),
            truth.len(),
            samples.unlisted
        )));
    }
    Ok(samples)
}

/// Keeps `limit` samples spread evenly over the list (every `len / limit`-th), so that a short
/// run still covers every class of a class-ordered set.
pub fn spread(samples: Samples, limit: usize) -> Samples {
    let n = samples.entries.len();
    if limit >= n {
        return samples;
    }
    let keep: Vec<usize> = (0..limit).map(|i| i * n / limit).collect();
    let mut entries: Vec<Option<Entry>> = samples.entries.into_iter().map(Some).collect();
    Samples {
        entries: keep.iter().filter_map(|&i| entries[i].take()).collect(),
        targets: keep.iter().map(|&i| samples.targets[i]).collect(),
        missing: samples.missing,
        unlisted: samples.unlisted,
    }
}

/// The place of class `target` in the ranking of `logits`, best first (0: top-1), ties in
/// index order as in [`crate::prediction::top_k`].
pub fn rank(logits: &[f32], target: usize) -> usize {
    let t = logits[target];
    logits
        .iter()
        .enumerate()
        .filter(|&(j, x)| match x.total_cmp(&t) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => j < target,
            std::cmp::Ordering::Less => false,
        })
        .count()
}

/// Running top-1 / top-5 counts.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Tally {
    /// Images classified.
    pub images: usize,
    /// Of those, with the target first.
    pub top1: usize,
    /// Of those, with the target among the first five.
    pub top5: usize,
    /// Images that could not be read or decoded (not in `images`).
    pub failed: usize,
}

impl Tally {
    /// Counts one image; returns its target's rank.
    pub fn add(&mut self, logits: &[f32], target: usize) -> usize {
        let r = rank(logits, target);
        self.images += 1;
        self.top1 += usize::from(r == 0);
        self.top5 += usize::from(r < 5);
        r
    }

    /// Top-1 accuracy, a fraction (0 with no images).
    pub fn top1_accuracy(&self) -> f64 {
        self.top1 as f64 / self.images.max(1) as f64
    }

    /// Top-5 accuracy, a fraction (0 with no images).
    pub fn top5_accuracy(&self) -> f64 {
        self.top5 as f64 / self.images.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_wordnet_ids_or_indices() {
        let imagenet = Labels::imagenet();
        assert_eq!(class_of("n02123045", Some(&imagenet), 1000), Ok(281));
        assert_eq!(class_of("281", Some(&imagenet), 1000), Ok(281));
        assert!(class_of("n99999999", Some(&imagenet), 1000)
            .unwrap_err()
            .contains("WordNet id"));
        assert_eq!(class_of("9", None, 10), Ok(9));
        assert!(class_of("10", None, 10).unwrap_err().contains("below 10"));
        assert!(class_of("cat", None, 10)
            .unwrap_err()
            .contains("no WordNet ids"));
    }

    #[test]
    fn ranks_follow_the_top_k_order_and_tallies_count_them() {
        let logits = [0.5, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0];
        // Order: 4, 1, 2 (tie: index order), 6, 0, 5, 3.
        assert_eq!(
            (0..7).map(|t| rank(&logits, t)).collect::<Vec<_>>(),
            [4, 1, 2, 6, 0, 5, 3]
        );
        let mut tally = Tally::default();
        for t in [4, 0, 3] {
            tally.add(&logits, t);
        }
        assert_eq!((tally.images, tally.top1, tally.top5), (3, 1, 2));
        assert!((tally.top5_accuracy() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn an_image_folder_maps_folders_to_classes_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "n01440764/a.jpg",
            "n01440764/sub/b.png",
            "n02123045/c.JPEG",
            "n02123045/x.txt",
        ] {
            let p = dir.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        let imagenet = Labels::imagenet();
        let s = image_folder(dir.path(), Some(&imagenet), 1000).unwrap();
        assert_eq!(s.targets, [0, 0, 281]);
        assert!(s.entries[1].path.ends_with("n01440764/sub/b.png"));
        fs::create_dir(dir.path().join("kitten")).unwrap();
        let e = image_folder(dir.path(), Some(&imagenet), 1000).unwrap_err();
        assert!(e.to_string().contains("kitten"), "{e}");
        let flat = tempfile::tempdir().unwrap();
        let e = image_folder(flat.path(), None, 10).unwrap_err();
        assert!(e.to_string().contains("--ground-truth"), "{e}");
    }

    #[test]
    fn a_ground_truth_csv_names_each_image_by_its_stem() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["v1.JPEG", "v2.png", "extra.jpg", "notes.txt"] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let csv = dir.path().join("truth.csv");
        fs::write(
            &csv,
            "ImageId,PredictionString\nv1,n02123045 1 2 3 4 n02123045 5 6 7 8\nv2,n01440764 0 0 1 1\nv3,n01440764 0 0 1 1\n",
        )
        .unwrap();
        let imagenet = Labels::imagenet();
        let s = with_ground_truth(dir.path(), &csv, Some(&imagenet), 1000).unwrap();
        assert_eq!(s.targets, [281, 0]);
        assert_eq!((s.missing, s.unlisted), (1, 1));
        fs::write(&csv, "ImageId,PredictionString\nv1\n").unwrap();
        let e = with_ground_truth(dir.path(), &csv, Some(&imagenet), 1000).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn a_spread_subset_covers_the_whole_list() {
        let samples = Samples {
            entries: (0..10)
                .map(|i| Entry {
                    path: PathBuf::from(format!("{i}")),
                    problem: None,
                })
                .collect(),
            targets: (0..10).collect(),
            ..Samples::default()
        };
        let s = spread(samples, 4);
        assert_eq!(s.targets, [0, 2, 5, 7]);
        assert_eq!(s.entries[3].path, PathBuf::from("7"));
    }
}
