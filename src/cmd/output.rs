//! Results on stdout, a line at a time (they stream as batches finish), and a reader that
//! closes the pipe early (`diracnet classify dir/ | head`) ends the run quietly: [`Closed`],
//! which `main` turns into a silent exit, instead of an error or a panic.

use std::{
    fmt::Display,
    io::{self, LineWriter, Write},
};

use anyhow::{Context, Result};

/// Stdout was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct Closed;

/// True when `e` (or what it wraps) is [`Closed`].
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Closed>())
}

/// Line-buffered stdout that reports a closed pipe as [`Closed`].
pub struct Stdout(LineWriter<io::Stdout>);

impl Stdout {
    /// Stdout, flushed at each line.
    pub fn new() -> Self {
        Self(LineWriter::new(io::stdout()))
    }

    /// Writes `text` and a newline.
    pub fn line(&mut self, text: impl Display) -> Result<()> {
        match writeln!(self.0, "{text}") {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
            r => r.context("writing to stdout"),
        }
    }

    /// Writes `text` with no newline, and flushes it (a line that grows as results come).
    pub fn write(&mut self, text: &str) -> Result<()> {
        match self
            .0
            .write_all(text.as_bytes())
            .and_then(|()| self.0.flush())
        {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
            r => r.context("writing to stdout"),
        }
    }

    /// Writes any buffered output.
    pub fn flush(&mut self) -> Result<()> {
        match self.0.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
            r => r.context("writing to stdout"),
        }
    }
}
