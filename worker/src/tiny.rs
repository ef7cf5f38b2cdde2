//! Placeholder until its owner lands it.

#[derive(Debug, clap::Args)]
pub struct InitTinyModelArgs {}

pub fn run_init(_args: InitTinyModelArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
