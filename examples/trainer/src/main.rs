//! respawn's sample training job: a small classifier (multinomial logistic regression
//! or a one-hidden-layer MLP) trained by mini-batch SGD on a CSV, following respawn's
//! checkpoint contract.
//!
//! - `RESPAWN_INPUT_DIR`: the data; `--data FILE`, else the first `*.csv` in it.
//! - `RESPAWN_CHECKPOINT_DIR`: `<step>/state.txt` + `<step>/.complete` (written last);
//!   a run resumes from the newest complete one and keeps the newest 2 locally.
//! - `RESPAWN_OUTPUT_DIR`: `model.txt` and `metrics.json` at the end.
//! - SIGTERM: finish the step, checkpoint, print `checkpointed step N on SIGTERM`,
//!   exit 143.
//! - Multi-node (`RESPAWN_NUM_NODES` > 1, `RESPAWN_NODE_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`; torchrun's `WORLD_SIZE` / `NODE_RANK` too): data-parallel steps
//!   with an all-reduce over TCP each step; rank 0 checkpoints and writes the
//!   outputs; a SIGTERM on any rank stops all of them after the same step (see
//!   `dist.rs`).
//!
//! A run that is interrupted and resumed any number of times writes a `model.txt`
//! byte-identical to an uninterrupted run with the same flags: see `model.rs` and
//! `rng.rs` for how.
//!
//! Exit codes: 0 done, 1 I/O error, 2 bad flags / data / checkpoint, 143 SIGTERM.

mod checkpoint;
mod data;
mod dist;
mod error;
mod math;
mod model;
mod rng;
mod train;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use signal_hook::consts::SIGTERM;

use crate::error::Error;

#[derive(Debug, Parser)]
// A repeated flag takes its last value, so a wrapper can append overrides.
#[command(name = "respawn-trainer", version, about, args_override_self = true)]
pub struct Args {
    /// Total number of SGD steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// Write a checkpoint (and print the loss) every K steps.
    #[arg(long, value_name = "K", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    /// Also print `step N` every N steps (0 = only at checkpoints), to show progress.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub log_every: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1, value_parser = positive_float)]
    pub lr: f64,
    /// Examples per SGD step, drawn with replacement.
    #[arg(long, default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: u64,
    /// Seed of the weight initialisation, the batches and --generate-csv.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Width of the tanh hidden layer; 0 = multinomial logistic regression.
    #[arg(long, value_name = "H", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub hidden: u64,
    /// Sleep this long after each step (to make training slow enough to preempt).
    #[arg(long, value_name = "D", default_value_t = 0)]
    pub step_delay_ms: u64,
    /// The CSV to train on (default: the first *.csv in RESPAWN_INPUT_DIR).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Write a synthetic 3-class, 4-feature CSV of ROWS rows to stdout and exit.
    #[arg(long, value_name = "ROWS")]
    pub generate_csv: Option<usize>,
}

fn positive_float(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn main() -> ExitCode {
    // Registered first, so that a SIGTERM at any later moment is caught rather than
    // killing the process before it could checkpoint.
    let term = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(SIGTERM, Arc::clone(&term)) {
        eprintln!("respawn-trainer: error: cannot handle SIGTERM: {e}");
        return ExitCode::from(error::EXIT_IO);
    }
    let args = Args::parse();
    let result = match args.generate_csv {
        Some(rows) => generate(rows, args.seed),
        None => train::run(&args, &term),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("respawn-trainer: error: {e}");
            ExitCode::from(e.code)
        }
    }
}

fn generate(rows: usize, seed: u64) -> Result<ExitCode, Error> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    data::generate(rows, seed, &mut out).map_err(|e| Error {
        code: error::EXIT_IO,
        message: format!("cannot write to stdout: {e}"),
    })?;
    Ok(ExitCode::SUCCESS)
}
