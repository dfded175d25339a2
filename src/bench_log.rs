#[derive(clap::Args)]
pub struct BenchLogArgs {}
pub fn run(_args: BenchLogArgs) -> anyhow::Result<()> { Ok(()) }
