//! Placeholder until its owner lands it.

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {}

pub fn run_generate(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
