//! Many files through a model with flat memory, for the command line (`classify` on folders,
//! `eval`): inputs are listed (directories walked), preprocessed a chunk at a time on worker
//! threads while the model runs the chunk before, and handed over in input order.
//!
//! ```text
//! paths ─ walk ─▶ [Entry] ─ coordinating thread: a chunk of inputs ─▶ workers decode ─┐
//!                                  ▲ rows in input order, channel(1) ◀─────────────────┘
//!                                  └─ caller: for chunk in stream { model, write }
//! ```
//!
//! At most three chunks exist at once (one being prepared, one waiting in the channel, one with
//! the caller), so memory stays flat over any number of files. The workers live as long as the
//! stream and decode on their own thread ([`preprocess::preprocess_here`]): threads made per
//! chunk or per image would each take a fresh malloc arena, and the freed buffers those keep
//! ([`crate::memory::keep_freed_buffers`]) would grow the process with the number of images. A
//! file that cannot be read or decoded becomes a row with its error; the run goes on.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    thread,
};

use std::panic::AssertUnwindSafe;

use crate::{npy, panic::panic_message, preprocess};

/// File extensions a directory walk takes as images (case-insensitive): the formats the
/// decoder reads.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "bmp", "webp", "gif", "tif", "tiff",
];

/// True when `path`'s extension is one of [`IMAGE_EXTENSIONS`].
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// One input: a file to read, or a path the walk could not read.
#[derive(Debug)]
pub struct Entry {
    /// The file (or the directory that failed).
    pub path: PathBuf,
    /// Why the walk could not list or open it, if so.
    pub problem: Option<String>,
}

/// The inputs behind `paths`, in order: a file as given (whatever its extension), a directory
/// as its image files ([`is_image_file`]), walked recursively in name order. Symbolic links to
/// files are followed, links to directories are not (no cycles). A directory that cannot be
/// read becomes an [`Entry`] with its problem.
pub fn walk(paths: &[PathBuf]) -> Vec<Entry> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk_dir(path, &mut out);
        } else {
            out.push(Entry {
                path: path.clone(),
                problem: None,
            });
        }
    }
    out
}

fn walk_dir(dir: &Path, out: &mut Vec<Entry>) {
    // The type as listed (no further `stat`, and a link is a link, not what it points to).
    let listed = fs::read_dir(dir).and_then(|entries| {
        entries
            .map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?))))
            .collect::<Result<Vec<_>, _>>()
    });
    let mut children = match listed {
        Ok(children) => children,
        Err(e) => {
            out.push(Entry {
                path: dir.to_path_buf(),
                problem: Some(format!("reading the directory: {e}")),
            });
            return;
        }
    };
    children.sort_by(|a, b| a.0.cmp(&b.0));
    for (child, kind) in children {
        if kind.is_dir() {
            walk_dir(&child, out);
        } else if is_image_file(&child) && (kind.is_file() || child.is_file()) {
            out.push(Entry {
                path: child,
                problem: None,
            });
        }
    }
}

/// One image of the stream: its name (the path, with `[i]` for row `i` of a `.npy`), and its
/// normalised `[3, 224, 224]` pixels or why there are none.
#[derive(Debug)]
pub struct Row {
    /// Which input this is.
    pub name: String,
    /// Index of the [`Entry`] it came from.
    pub entry: usize,
    /// The preprocessed image, or the error that stopped it.
    pub image: Result<Vec<f32>, String>,
}

/// The preprocessed images among `rows` (those that failed left out), for the model.
pub fn images(rows: &[Row]) -> Vec<&[f32]> {
    rows.iter()
        .filter_map(|r| r.image.as_deref().ok())
        .collect()
}

/// How [`Stream`] prepares its inputs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Inputs per chunk (a multiple of the batch size keeps batches full).
    pub chunk: usize,
    /// Threads decoding and resizing a chunk.
    pub workers: usize,
    /// The decoder's pixel limit (decompression bombs).
    pub max_pixels: u64,
}

impl Options {
    /// Chunks of `batch` inputs (a forward pass each), decoded on every available core.
    pub fn for_batches(batch: usize, max_pixels: u64) -> Self {
        Self {
            chunk: batch,
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
            max_pixels,
        }
    }
}

/// Preprocessed rows, a chunk at a time, in input order; see the module docs.
pub struct Stream {
    rx: mpsc::Receiver<Vec<Row>>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// One input for a worker: its place in the chunk, its index, the entry.
type Job = (usize, usize, Entry);

impl Stream {
    /// Starts preparing `entries` on background threads (an error only if a thread cannot be
    /// started).
    pub fn start(entries: Vec<Entry>, opts: Options) -> std::io::Result<Self> {
        // One chunk waits in the channel while the caller works on the one before.
        let (tx, rx) = mpsc::sync_channel(1);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<Row>)>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();
        for i in 0..opts.workers.max(1) {
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            let worker = thread::Builder::new()
                .name(format!("preprocess-{i}"))
                .spawn(move || loop {
                    // The lock is held only to take a job (a worker that panics does so
                    // outside it, below, so it is never poisoned).
                    let job = match jobs.lock() {
                        Ok(jobs) => jobs.recv(),
                        Err(_) => return,
                    };
                    let Ok((slot, index, entry)) = job else {
                        return; // the coordinator is done
                    };
                    // A panic (a bug) is that input's error row, never a missing row.
                    let rows = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        load(index, &entry, opts.max_pixels)
                    }))
                    .unwrap_or_else(|payload| {
                        vec![Row {
                            name: entry.path.display().to_string(),
                            entry: index,
                            image: Err(format!(
                                "internal error while preprocessing: {}",
                                panic_message(&*payload, "panic")
                            )),
                        }]
                    });
                    if done.send((slot, rows)).is_err() {
                        return;
                    }
                })?;
            threads.push(worker);
        }
        drop(done_tx);
        let coordinator = thread::Builder::new()
            .name("preprocess".into())
            .spawn(move || {
                let mut entries = entries.into_iter().enumerate().peekable();
                while entries.peek().is_some() {
                    let mut sent = 0;
                    for (index, entry) in entries.by_ref().take(opts.chunk.max(1)) {
                        if job_tx.send((sent, index, entry)).is_err() {
                            return;
                        }
                        sent += 1;
                    }
                    // Every job answers (a panic as an error row), so this waits for all.
                    let mut rows: Vec<(usize, Vec<Row>)> = done_rx.iter().take(sent).collect();
                    if rows.len() < sent {
                        return; // no worker left: end the stream rather than hang
                    }
                    rows.sort_by_key(|(slot, _)| *slot);
                    let rows = rows.into_iter().flat_map(|(_, rows)| rows).collect();
                    if tx.send(rows).is_err() {
                        return; // the caller stopped reading
                    }
                }
                // Returning drops `job_tx`, which ends the workers.
            })?;
        threads.push(coordinator);
        Ok(Self { rx, threads })
    }
}

impl Iterator for Stream {
    type Item = Vec<Row>;

    fn next(&mut self) -> Option<Vec<Row>> {
        self.rx.recv().ok()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Unblock the coordinator (its send fails once the receiver is gone; returning, it drops
        // the job queue, which ends the workers), then wait for them all.
        let (_, rx) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The rows of one entry: one for an image, one per image of a `.npy`, one error row for an
/// input that cannot be read.
fn load(index: usize, entry: &Entry, max_pixels: u64) -> Vec<Row> {
    let name = entry.path.display().to_string();
    let failed = |error: String| {
        vec![Row {
            name: name.clone(),
            entry: index,
            image: Err(error),
        }]
    };
    if let Some(problem) = &entry.problem {
        return failed(problem.clone());
    }
    let npy = entry
        .path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if npy {
        let images = match npy_images(&entry.path, max_pixels) {
            Ok(images) => images,
            Err(e) => return failed(e),
        };
        return images
            .into_iter()
            .enumerate()
            .map(|(i, image)| Row {
                name: format!("{name}[{i}]"),
                entry: index,
                image,
            })
            .collect();
    }
    let image = fs::read(&entry.path)
        .map_err(|e| format!("reading the file: {e}"))
        .and_then(|bytes| {
            preprocess::preprocess_here(&bytes, max_pixels).map_err(|e| e.to_string())
        });
    vec![Row {
        name,
        entry: index,
        image,
    }]
}

/// The images of a `.npy` file: float32/float64 `[N, 3, 224, 224]` preprocessed inputs, or
/// uint8 RGB pixels `[H, W, 3]` or `[N, H, W, 3]` (as `numpy.asarray(PIL.Image)` gives; reverse
/// OpenCV's BGR first), which are resized, cropped and normalised like decoded files. The file
/// is read whole (one input of the stream, however many images it holds).
fn npy_images(path: &Path, max_pixels: u64) -> Result<Vec<Result<Vec<f32>, String>>, String> {
    // The row is named by the path already: the error says what is wrong with the file.
    let array = npy::read(path).map_err(|e| match e {
        npy::NpyError::Io { cause, .. } => format!("reading the file: {cause}"),
        npy::NpyError::Format { reason, .. } => reason,
    })?;
    match array.data {
        npy::NpyData::F32(data) => {
            let inputs = crate::tensor::HostTensor {
                shape: array.shape,
                data,
            };
            match inputs.input_rows() {
                Some(rows) if rows.len() > 0 => Ok(rows.map(|r| Ok(r.to_vec())).collect()),
                Some(_) => Err("the array holds no image (N = 0)".into()),
                None => Err(format!(
                    "float shape {:?}; expected preprocessed inputs [N, 3, 224, 224]",
                    inputs.shape
                )),
            }
        }
        npy::NpyData::U8(pixels) => {
            let (n, h, w) = match array.shape[..] {
                [h, w, 3] => (1, h, w),
                [n, h, w, 3] => (n, h, w),
                _ => {
                    return Err(format!(
                        "uint8 shape {:?}; expected RGB pixels [H, W, 3] or [N, H, W, 3]",
                        array.shape
                    ))
                }
            };
            let (Ok(wu), Ok(hu)) = (u32::try_from(w), u32::try_from(h)) else {
                return Err(format!("{w}x{h} pixels: too large"));
            };
            if n == 0 {
                return Err("the array holds no image (N = 0)".into());
            }
            let per_image = h * w * 3;
            Ok((0..n)
                .map(|i| {
                    let image = pixels[i * per_image..][..per_image].to_vec();
                    preprocess::from_rgb8(wu, hu, image, max_pixels).map_err(|e| e.to_string())
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_takes_image_files_recursively_in_name_order_and_files_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/inner")).unwrap();
        fs::create_dir_all(root.join("a")).unwrap();
        for f in [
            "b/inner/z.JPG",
            "b/y.png",
            "a/x.webp",
            "a/notes.txt",
            "a/data.npy",
            "top.gif",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
        let given = root.join("a/notes.txt");
        let got: Vec<PathBuf> = walk(&[root.to_path_buf(), given.clone()])
            .into_iter()
            .map(|e| {
                assert!(e.problem.is_none());
                e.path
            })
            .collect();
        let want: Vec<PathBuf> = ["a/x.webp", "b/inner/z.JPG", "b/y.png", "top.gif"]
            .iter()
            .map(|f| root.join(f))
            .chain([given])
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_stream_keeps_input_order_and_turns_bad_files_into_error_rows() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = |name: &str| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/images")
                .join(name)
        };
        let bad = dir.path().join("bad.jpg");
        fs::write(&bad, b"not a jpeg").unwrap();
        let missing = dir.path().join("missing.png");
        let paths = [
            fixture("chelsea.jpg"),
            bad.clone(),
            missing,
            fixture("chelsea.jpg"),
            fixture("chelsea.jpg"),
        ];
        let entries = walk(&paths);
        let stream = Stream::start(
            entries,
            Options {
                chunk: 2,
                workers: 2,
                max_pixels: preprocess::DEFAULT_MAX_PIXELS,
            },
        )
        .unwrap();
        let chunks: Vec<Vec<Row>> = stream.collect();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let rows: Vec<Row> = chunks.into_iter().flatten().collect();
        assert_eq!(
            rows.iter().map(|r| r.entry).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(rows[0].name, paths[0].display().to_string());
        let first = rows[0].image.as_ref().unwrap();
        assert_eq!(first.len(), crate::tensor::INPUT_LEN);
        assert_eq!(rows[3].image.as_ref().unwrap(), first);
        assert!(rows[1].image.is_err());
        let missing = rows[2].image.as_ref().unwrap_err();
        assert!(missing.contains("reading the file"), "{missing}");
    }

    #[test]
    fn dropping_a_stream_early_stops_its_thread() {
        let fixture =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/chelsea.jpg");
        let entries = walk(&vec![fixture; 12]);
        let mut stream = Stream::start(
            entries,
            Options {
                chunk: 1,
                workers: 1,
                max_pixels: preprocess::DEFAULT_MAX_PIXELS,
            },
        )
        .unwrap();
        assert_eq!(stream.next().map(|c| c.len()), Some(1));
        drop(stream); // joins the threads: returns only because the coordinator's send fails
    }
}
