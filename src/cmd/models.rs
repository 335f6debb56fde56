//! `diracnet models`: the built-in registry.

use anyhow::Result;
use diracnet::registry::Registry;

/// Prints each registry model: name, kind, description, URL.
pub fn run() -> Result<()> {
    let registry = Registry::builtin()?;
    for e in registry.entries() {
        println!(
            "{:<24} {:?}  {}\n{:<24} {}",
            e.name, e.kind, e.description, "", e.url
        );
    }
    Ok(())
}
