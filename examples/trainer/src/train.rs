//! The training run: resume, step, checkpoint, stop on SIGTERM, write the outputs.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::Args;
use crate::checkpoint::{self, Settings, State};
use crate::data::{self, Dataset};
use crate::dist::{Link, Start, World};
use crate::error::Error;
use crate::model::{Model, Shape};

/// Complete checkpoints kept on local disk: the newest, and the one before it in case
/// the newest turns out unreadable. The node agent keeps `checkpoint.keep_last` remotely.
const KEEP_LOCAL: usize = 2;
/// 128 + SIGTERM: what a shell reports for a process killed by SIGTERM, so respawn
/// reads it as "stopped by the preemption notice", not as a failure.
const EXIT_SIGTERM: u8 = 143;

/// The directories and identity that respawn's node agent passes in the environment.
#[derive(Debug)]
struct Contract {
    job_id: Option<String>,
    attempt: Option<String>,
    grace_seconds: Option<String>,
    input_dir: Option<PathBuf>,
    checkpoint_dir: Option<PathBuf>,
    output_dir: Option<PathBuf>,
}

/// A variable's value; unset and empty are the same.
fn var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.is_empty())
}

impl Contract {
    fn from_env() -> Contract {
        Contract {
            job_id: var("RESPAWN_JOB_ID"),
            attempt: var("RESPAWN_ATTEMPT"),
            grace_seconds: var("RESPAWN_GRACE_SECONDS"),
            input_dir: var("RESPAWN_INPUT_DIR").map(PathBuf::from),
            checkpoint_dir: var("RESPAWN_CHECKPOINT_DIR").map(PathBuf::from),
            output_dir: var("RESPAWN_OUTPUT_DIR").map(PathBuf::from),
        }
    }

    fn print(&self, step_delay_ms: u64) {
        let unset = || "(unset)".to_string();
        println!(
            "respawn-trainer {}: job {} attempt {}",
            env!("CARGO_PKG_VERSION"),
            self.job_id.clone().unwrap_or_else(unset),
            self.attempt.clone().unwrap_or_else(unset),
        );
        // The grace period is the agent's business (it sends SIGKILL when it ends);
        // the trainer only warns when a single step could outlast it.
        if let Some(grace) = &self.grace_seconds {
            match grace.parse::<f64>() {
                Ok(g) if step_delay_ms as f64 >= g * 1000.0 => println!(
                    "warning: --step-delay-ms {step_delay_ms} is longer than the {g}s grace period"
                ),
                Ok(g) => println!("grace period {g}s after SIGTERM"),
                Err(_) => println!("warning: RESPAWN_GRACE_SECONDS={grace:?} is not a number"),
            }
        }
        match &self.checkpoint_dir {
            Some(dir) => println!("checkpoints in {}", dir.display()),
            None => println!("no RESPAWN_CHECKPOINT_DIR: checkpointing is off"),
        }
    }
}

/// How a run of the training loop ended.
enum Stop {
    Finished,
    Terminated,
}

struct Trainer<'a> {
    args: &'a Args,
    data: Dataset,
    settings: Settings,
    checkpoint_dir: Option<PathBuf>,
    term: &'a AtomicBool,
    /// Its place among the ranks of a multi-node run.
    world: Option<World>,
}

/// Trains per `args` and the environment; returns the exit code.
pub fn run(args: &Args, term: &AtomicBool) -> Result<ExitCode, Error> {
    let contract = Contract::from_env();
    contract.print(args.step_delay_ms);
    let path = data::locate(args.data.as_deref(), contract.input_dir.as_deref())?;
    let data = data::load(&path)?;
    println!(
        "data {}: {} rows, {} features, {} classes",
        path.display(),
        data.rows,
        data.features,
        data.classes()
    );
    let world = World::from_env()?;
    if let Some(w) = &world {
        println!(
            "rank {} of {} (data-parallel; rank 0 checkpoints and writes the model)",
            w.rank, w.ranks
        );
    }
    let trainer = Trainer {
        world,
        settings: Settings {
            seed: args.seed,
            lr: args.lr,
            batch_size: usize::try_from(args.batch_size).unwrap_or(usize::MAX),
            data_fingerprint: data.fingerprint,
        },
        data,
        args,
        checkpoint_dir: contract.checkpoint_dir,
        term,
    };
    let mut state = trainer.resume_or_start()?;
    let mut link = match &trainer.world {
        Some(w) => {
            let start = Start::of(state.step, &state.model.params);
            match Link::meet(w, start, term)? {
                Some(link) => Some(link),
                None => {
                    println!("SIGTERM before the ranks met, at step {}", state.step);
                    return Ok(ExitCode::from(EXIT_SIGTERM));
                }
            }
        }
        None => None,
    };
    match trainer.train(&mut state, link.as_mut())? {
        Stop::Terminated => Ok(ExitCode::from(EXIT_SIGTERM)),
        Stop::Finished => {
            trainer.finish(&state, contract.output_dir.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl Trainer<'_> {
    fn shape(&self) -> Shape {
        Shape {
            features: self.data.features,
            hidden: usize::try_from(self.args.hidden).unwrap_or(usize::MAX),
            classes: self.data.classes(),
        }
    }

    /// The newest complete checkpoint, or fresh weights.
    fn resume_or_start(&self) -> Result<State, Error> {
        let shape = self.shape();
        println!(
            "model {shape} ({}, {} parameters); {} steps, batch {}, lr {}, seed {}",
            if shape.hidden == 0 {
                "softmax regression"
            } else {
                "tanh MLP"
            },
            shape.param_count(),
            self.args.steps,
            self.settings.batch_size,
            self.settings.lr,
            self.settings.seed,
        );
        let resumed = match &self.checkpoint_dir {
            Some(dir) => checkpoint::load_newest(dir)?,
            None => None,
        };
        let Some(mut state) = resumed else {
            println!("starting from scratch");
            return Ok(State {
                step: 0,
                model: Model::init(shape, self.settings.seed),
                settings: self.settings,
            });
        };
        self.check_compatible(&state)?;
        println!("resumed from step {}", state.step);
        // Checkpoints written from now on record what this run trains with.
        state.settings = self.settings;
        Ok(state)
    }

    /// A checkpoint of another shape cannot be loaded: a user error, not something to
    /// paper over by starting from scratch. Other differences only change the result.
    fn check_compatible(&self, state: &State) -> Result<(), Error> {
        let (old, new) = (state.model.shape, self.shape());
        if old != new {
            return Err(Error::input(format!(
                "the checkpoint at step {} is a {old} model, this run builds {new} \
                 (other --hidden or data): rerun with the same flags and data, or use an \
                 empty RESPAWN_CHECKPOINT_DIR",
                state.step
            )));
        }
        let (o, n) = (state.settings, self.settings);
        let differs = [
            ("--seed", o.seed != n.seed),
            ("--lr", o.lr.to_bits() != n.lr.to_bits()),
            ("--batch-size", o.batch_size != n.batch_size),
            ("the data file", o.data_fingerprint != n.data_fingerprint),
        ];
        for (what, _) in differs.iter().filter(|d| d.1) {
            println!(
                "warning: {what} differs from the run that wrote step {}; the model will \
                 differ from an uninterrupted run",
                state.step
            );
        }
        if state.step > self.args.steps {
            println!(
                "warning: the checkpoint is at step {}, past --steps {}",
                state.step, self.args.steps
            );
        }
        Ok(())
    }

    /// Whether this rank writes checkpoints and outputs: rank 0, or the only one.
    fn writes(&self) -> bool {
        self.world.as_ref().is_none_or(|w| w.rank == 0)
    }

    /// SGD steps until `--steps` or a SIGTERM (on any rank, with `link`),
    /// checkpointing every `--checkpoint-every`.
    fn train(&self, state: &mut State, mut link: Option<&mut Link>) -> Result<Stop, Error> {
        let batch = self.settings.batch_size;
        loop {
            let stop = self.term.load(Ordering::SeqCst);
            if stop && link.is_none() {
                self.checkpoint_on_sigterm(state)?;
                return Ok(Stop::Terminated);
            }
            if state.step >= self.args.steps {
                return Ok(Stop::Finished);
            }
            let (seed, lr) = (self.settings.seed, self.settings.lr);
            match (&mut link, &self.world) {
                (Some(link), Some(w)) => {
                    let mut grad = state
                        .model
                        .gradient_share(&self.data, seed, state.step, batch, w.rank, w.ranks);
                    // Every rank stops before the same step when any got SIGTERM.
                    if !link.all_reduce(&mut grad, stop)? {
                        self.checkpoint_on_sigterm(state)?;
                        return Ok(Stop::Terminated);
                    }
                    state.model.apply(&grad, lr, batch);
                }
                _ => state
                    .model
                    .sgd_step(&self.data, seed, state.step, batch, lr),
            }
            state.step += 1;
            if self.args.log_every > 0 && state.step.is_multiple_of(self.args.log_every) {
                println!("step {}", state.step);
            }
            self.pause();
            if state.step.is_multiple_of(self.args.checkpoint_every) {
                self.checkpoint(state)?;
                // After the checkpoint, so that a printed step is a saved step.
                let (loss, _) = state.model.evaluate(&self.data);
                println!("step {} loss {loss:.6}", state.step);
            }
        }
    }

    /// `--step-delay-ms`, cut short by SIGTERM: the step's work is already done.
    fn pause(&self) {
        let end = Instant::now() + Duration::from_millis(self.args.step_delay_ms);
        while !self.term.load(Ordering::SeqCst) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            thread::sleep(left.min(Duration::from_millis(10)));
        }
    }

    /// Saves `state` (unless complete already) and prunes old checkpoints.
    fn checkpoint(&self, state: &State) -> Result<(), Error> {
        let Some(dir) = self.checkpoint_dir.as_ref().filter(|_| self.writes()) else {
            return Ok(());
        };
        if checkpoint::save(dir, state)? {
            checkpoint::prune(dir, KEEP_LOCAL)?;
        }
        Ok(())
    }

    fn checkpoint_on_sigterm(&self, state: &State) -> Result<(), Error> {
        if !self.writes() {
            println!(
                "stopped at step {} on SIGTERM (rank 0 checkpoints)",
                state.step
            );
            return Ok(());
        }
        if self.checkpoint_dir.is_none() {
            println!("SIGTERM at step {}: checkpointing is off", state.step);
            return Ok(());
        }
        self.checkpoint(state)?;
        println!("checkpointed step {} on SIGTERM", state.step);
        Ok(())
    }

    /// The final checkpoint (so that a kill from here on does not redo training), then
    /// `model.txt` and `metrics.json`.
    fn finish(&self, state: &State, output_dir: Option<&Path>) -> Result<(), Error> {
        self.checkpoint(state)?;
        let (loss, accuracy) = state.model.evaluate(&self.data);
        match output_dir.filter(|_| self.writes()) {
            Some(dir) => write_outputs(dir, state, loss, accuracy)?,
            None => println!("no RESPAWN_OUTPUT_DIR: model not written"),
        }
        println!(
            "done: steps={} loss={loss:.6} accuracy={accuracy:.4}",
            state.step
        );
        Ok(())
    }
}

/// `model.txt`: one parameter a line in `{:e}` (Rust prints the shortest decimal that
/// reads back to the same bits), layer by layer, weights row-major then biases.
fn model_text(model: &Model) -> String {
    model.params.iter().map(|p| format!("{p:e}\n")).collect()
}

/// A JSON number, or `null` for NaN and infinities (which JSON cannot express).
fn json_number(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        "null".into()
    }
}

fn write_outputs(dir: &Path, state: &State, loss: f64, accuracy: f64) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, &e))?;
    let metrics = format!(
        "{{\"steps\":{},\"final_loss\":{},\"train_accuracy\":{}}}\n",
        state.step,
        json_number(loss),
        json_number(accuracy)
    );
    write_atomically(&dir.join("model.txt"), &model_text(&state.model))?;
    write_atomically(&dir.join("metrics.json"), &metrics)?;
    checkpoint::sync_dir(dir).map_err(|e| Error::io("cannot sync", dir, &e))
}

/// Writes a temporary file and renames it over `path`, so that the agent syncing the
/// output directory never uploads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    checkpoint::write_synced(&tmp, text.as_bytes())
        .map_err(|e| Error::io("cannot write", &tmp, &e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename", &tmp, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_text_round_trips() {
        let shape = Shape {
            features: 2,
            hidden: 0,
            classes: 2,
        };
        let mut model = Model::init(shape, 1);
        model.params[0] = 0.1 + 0.2;
        model.params[1] = -0.0;
        let text = model_text(&model);
        let back: Vec<u64> = text
            .lines()
            .map(|l| l.parse::<f64>().expect("a float").to_bits())
            .collect();
        let bits: Vec<u64> = model.params.iter().map(|p| p.to_bits()).collect();
        assert_eq!(back, bits);
    }

    #[test]
    fn json_numbers() {
        assert_eq!(json_number(0.5), "0.5");
        assert_eq!(json_number(f64::NAN), "null");
    }
}
