//! `diracnet fetch`: download and convert models into the cache; print each safetensors path.

use anyhow::{Context, Result};
use clap::Args;
use diracnet::weights;

use super::ModelArgs;

/// `diracnet fetch` flags.
#[derive(Args)]
pub struct FetchArgs {
    #[command(flatten)]
    models: ModelArgs,
}

/// Resolves each model's weights; prints `NAME<TAB>PATH` per model.
pub async fn run(args: &FetchArgs) -> Result<()> {
    let opts = args.models.weights_options();
    for spec in args.models.specs()? {
        let w = weights::resolve(&spec, &opts)
            .await
            .with_context(|| format!("model {}", spec.name))?;
        println!("{}\t{}", spec.name, w.path.display());
    }
    Ok(())
}
