//! `diracnet convert`: any supported `.pth` → folded safetensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use diracnet::weights::{convert, fetch};

/// `diracnet convert` arguments.
#[derive(Args)]
pub struct ConvertArgs {
    /// Input `.pth` file.
    input: PathBuf,
    /// Output `.safetensors` file.
    output: PathBuf,
}

/// Converts, and prints what was found and written.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let (input, output) = (&args.input, &args.output);
    let sha256 =
        fetch::sha256_file(input).with_context(|| format!("reading {}", input.display()))?;
    let provenance = convert::Provenance {
        source: input.display().to_string(),
        sha256,
    };
    let c = convert::convert_pth(input, output, &provenance)?;
    let a = &c.architecture;
    println!(
        "{}: {} {} checkpoint → {} (DiracNet-{}, widths {:?}, blocks {:?}, {} classes)",
        input.display(),
        c.container,
        c.layout,
        output.display(),
        a.depth(),
        a.widths,
        a.blocks,
        a.classes
    );
    Ok(())
}
