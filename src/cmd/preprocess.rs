//! `diracnet preprocess`: one image → the network input as a float32 `.npy` `[1, 3, 224, 224]`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use diracnet::{
    npy,
    preprocess::{self, DEFAULT_MAX_PIXELS},
    tensor::{INPUT_CHANNELS, INPUT_SIZE},
};

/// `diracnet preprocess` flags.
#[derive(Args)]
pub struct PreprocessArgs {
    /// Image file (JPEG, PNG, BMP, WebP, GIF, TIFF).
    image: PathBuf,
    /// Output `.npy` file.
    #[arg(short, long)]
    output: PathBuf,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, env = "DIRACNET_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

/// Preprocesses and writes the `.npy`; prints its path.
pub fn run(args: &PreprocessArgs) -> Result<()> {
    let (image, output) = (&args.image, &args.output);
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let x = preprocess::preprocess(&bytes, args.max_pixels)
        .with_context(|| image.display().to_string())?;
    npy::write_f32(output, &[1, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE], &x)?;
    println!("{}", output.display());
    Ok(())
}
