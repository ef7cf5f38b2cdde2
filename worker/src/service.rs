//! Placeholder until its owner lands it.

#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

pub fn run_serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
