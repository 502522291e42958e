//! The `tether` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tether: an access proxy that verifies workload identity, requires a
/// human owner for every agent, and checks every request against Cedar.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, registry, Cedar schema and policies, and exit.
    Check {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the whole story on this machine, with no setup.
    Demo,
    /// Print the JSON schema of the config file.
    Schema,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => tether::server::run(&config).map(|()| true),
        Command::Check { config } => tether::check::run(&config),
        Command::Demo => tether::demo::run(),
        Command::Schema => {
            print!("{}", tether_config::Config::json_schema());
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
