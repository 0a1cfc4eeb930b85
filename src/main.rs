//! Placeholder command line: only `luamilter bench` until the daemon lands.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load-test a milter the way Postfix talks to it
    Bench(luamilter::loadgen::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => luamilter::loadgen::run_and_print(args).await,
    }
}
