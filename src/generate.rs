//! `tandem generate` and `tandem bench engine`: the engine driven from the command line.
//! (Being written for the engine issue.)

#[derive(clap::Args)]
pub struct GenerateArgs {}

#[derive(clap::Args)]
pub struct BenchEngineArgs {}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("tandem generate: not built yet")
}

pub fn bench_engine(_args: BenchEngineArgs) -> anyhow::Result<()> {
    anyhow::bail!("tandem bench engine: not built yet")
}
