//! `diracnet models`: the built-in registry.

use anyhow::Result;
use diracnet::registry::Registry;

use super::output::Stdout;

/// Prints each registry model: name, kind, description, URL, published accuracy.
pub fn run() -> Result<()> {
    let registry = Registry::builtin()?;
    let mut out = Stdout::new();
    for e in registry.entries() {
        out.line(format!(
            "{:<24} {:?}  {}\n{:<24} {}",
            e.name, e.kind, e.description, "", e.url
        ))?;
        if let Some(p) = e.published() {
            out.line(format!(
                "{:<24} published: {:.2} % top-1 / {:.2} % top-5 error (ILSVRC2012 val; `diracnet eval` checks it)",
                "", p.top1_error, p.top5_error
            ))?;
        }
    }
    out.flush()
}
