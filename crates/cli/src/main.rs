//! `respawn`: the command line of the respawn job broker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod validate;

/// Train on preemptible GPUs without losing a job.
#[derive(Debug, Parser)]
#[command(name = "respawn", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check job spec files offline; print every problem with its field path.
    Validate {
        /// Spec files (YAML, or JSON when named *.json).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the parsed spec (secrets redacted) as JSON.
        #[arg(long)]
        print: bool,
    },
    /// Print the JSON Schemas generated from respawn's types, or write them to a folder.
    Schema {
        /// Write each schema into this folder instead of printing the job spec schema.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files, print } => validate::run(&files, print),
        Command::Schema { write } => schema(write),
    }
}

fn schema(write: Option<PathBuf>) -> ExitCode {
    let Some(dir) = write else {
        print!("{}", respawn_core::schema::job_spec());
        return ExitCode::SUCCESS;
    };
    for (name, text) in respawn_core::schema::all() {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
