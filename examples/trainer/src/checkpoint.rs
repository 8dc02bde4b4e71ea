//! Checkpoints in respawn's layout: `<dir>/<step>/state.txt` plus an empty
//! `<dir>/<step>/.complete`, written last, after `state.txt` is fsync'd. The node agent
//! uploads only complete directories, and a resumed attempt restores the newest one.
//!
//! `state.txt` is text, one value a line, floats as the hex of their IEEE-754 bits so
//! that they restore exactly:
//!
//! ```text
//! respawn-trainer checkpoint 1
//! step 1200
//! features 4
//! hidden 16
//! classes 3
//! seed 7
//! lr 3fb999999999999a
//! batch_size 32
//! data_fnv1a64 8f1d2c3b4a596877
//! params 131
//! 3fd2a7c0d5e1f000        (131 lines, in model.txt's order)
//! ...
//! end
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::model::{Model, Shape};

const MAGIC: &str = "respawn-trainer checkpoint 1";
const STATE_FILE: &str = "state.txt";
const COMPLETE_MARKER: &str = ".complete";

/// What the model was trained with. Resuming with other values is allowed (say, a
/// lower learning rate) but the result then differs from an uninterrupted run, so the
/// trainer warns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub seed: u64,
    pub lr: f64,
    pub batch_size: usize,
    pub data_fingerprint: u64,
}

/// The full training state: with plain SGD and counter-based batches, this is all.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub step: u64,
    pub model: Model,
    pub settings: Settings,
}

/// Serialises `state` in the format above.
pub fn encode(state: &State) -> String {
    let shape = state.model.shape;
    let s = &state.settings;
    let mut out = format!(
        "{MAGIC}\nstep {}\nfeatures {}\nhidden {}\nclasses {}\nseed {}\nlr {:016x}\n\
         batch_size {}\ndata_fnv1a64 {:016x}\nparams {}\n",
        state.step,
        shape.features,
        shape.hidden,
        shape.classes,
        s.seed,
        s.lr.to_bits(),
        s.batch_size,
        s.data_fingerprint,
        state.model.params.len(),
    );
    for p in &state.model.params {
        out.push_str(&format!("{:016x}\n", p.to_bits()));
    }
    out.push_str("end\n");
    out
}

/// Parses a `state.txt`; any deviation from the format is an error (the message says
/// where), never a panic.
pub fn decode(text: &str) -> Result<State, String> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let mut next = || lines.next().ok_or_else(|| "truncated".to_string());
    let (_, magic) = next()?;
    if magic != MAGIC {
        return Err(format!("line 1: expected {MAGIC:?}"));
    }
    let mut field = |key: &str| -> Result<(usize, String), String> {
        let (n, line) = next()?;
        match line.split_once(' ') {
            Some((k, v)) if k == key => Ok((n, v.to_string())),
            _ => Err(format!("line {n}: expected `{key} <value>`")),
        }
    };
    let step = dec(field("step")?)?;
    let shape = Shape {
        features: dec(field("features")?)?,
        hidden: dec(field("hidden")?)?,
        classes: dec(field("classes")?)?,
    };
    let settings = Settings {
        seed: dec(field("seed")?)?,
        lr: f64::from_bits(hex(field("lr")?)?),
        batch_size: dec(field("batch_size")?)?,
        data_fingerprint: hex(field("data_fnv1a64")?)?,
    };
    let count: usize = dec(field("params")?)?;
    if count != shape.param_count() {
        return Err(format!(
            "{count} params, but the shape needs {}",
            shape.param_count()
        ));
    }
    let mut params = Vec::with_capacity(count);
    for _ in 0..count {
        let (n, line) = next()?;
        params.push(f64::from_bits(hex((n, line.to_string()))?));
    }
    match next()? {
        (_, "end") => Ok(State {
            step,
            model: Model { shape, params },
            settings,
        }),
        (n, _) => Err(format!("line {n}: expected `end`")),
    }
}

fn dec<T: std::str::FromStr>((n, v): (usize, String)) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("line {n}: {v:?} is not a decimal integer"))
}

fn hex((n, v): (usize, String)) -> Result<u64, String> {
    if v.len() != 16 {
        return Err(format!("line {n}: expected 16 hex digits, got {v:?}"));
    }
    u64::from_str_radix(&v, 16).map_err(|_| format!("line {n}: {v:?} is not hex"))
}

/// The directory of the checkpoint at `step`.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(step.to_string())
}

fn is_complete(step_dir: &Path) -> bool {
    step_dir.join(COMPLETE_MARKER).is_file()
}

/// Steps that have a directory under `dir`, ascending, with whether each is complete.
/// Names that are not a canonical decimal step (`latest`, `007`, `.tmp`) are not ours.
fn list(dir: &Path) -> Result<Vec<(u64, bool)>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list", dir, &e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, &e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if name.to_str() == Some(&step.to_string()) && entry.path().is_dir() {
            steps.push((step, is_complete(&entry.path())));
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// Complete checkpoint steps under `dir`, ascending.
pub fn complete_steps(dir: &Path) -> Result<Vec<u64>, Error> {
    Ok(list(dir)?
        .into_iter()
        .filter_map(|(step, complete)| complete.then_some(step))
        .collect())
}

/// The newest complete checkpoint that reads back, if any. A complete checkpoint that
/// does not parse breaks the contract (bit rot, a bad sync); rather than fail the job,
/// it is skipped with a warning and the next older one is tried.
pub fn load_newest(dir: &Path) -> Result<Option<State>, Error> {
    for step in complete_steps(dir)?.into_iter().rev() {
        let path = step_dir(dir, step).join(STATE_FILE);
        let parsed = fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| decode(&text));
        match parsed {
            Ok(state) if state.step == step => return Ok(Some(state)),
            Ok(state) => eprintln!(
                "warning: {} holds step {}, skipping it",
                path.display(),
                state.step
            ),
            Err(e) => eprintln!("warning: skipping unreadable {}: {e}", path.display()),
        }
    }
    Ok(None)
}

/// Writes the checkpoint of `state` unless a complete one exists for its step
/// (complete directories are immutable). Returns whether it wrote one.
pub fn save(dir: &Path, state: &State) -> Result<bool, Error> {
    let target = step_dir(dir, state.step);
    if is_complete(&target) {
        return Ok(false);
    }
    // An incomplete directory is debris of a write that was killed: start it over.
    if target.exists() {
        fs::remove_dir_all(&target).map_err(|e| Error::io("cannot remove", &target, &e))?;
    }
    fs::create_dir_all(&target).map_err(|e| Error::io("cannot create", &target, &e))?;
    let state_path = target.join(STATE_FILE);
    write_synced(&state_path, encode(state).as_bytes())
        .map_err(|e| Error::io("cannot write", &state_path, &e))?;
    // The marker goes last: whoever sees it may rely on state.txt being whole.
    let marker = target.join(COMPLETE_MARKER);
    write_synced(&marker, b"").map_err(|e| Error::io("cannot write", &marker, &e))?;
    for d in [target.as_path(), dir] {
        sync_dir(d).map_err(|e| Error::io("cannot sync", d, &e))?;
    }
    Ok(true)
}

/// Creates `path` with `bytes` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// fsyncs a directory so that the entries just created in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Keeps the newest `keep` complete checkpoints and deletes the older ones, and the
/// debris of killed writes older than the newest complete one. Called right after a
/// save, so the checkpoint a run resumed from is only deleted once a newer one is
/// complete. Failures are warnings: a leftover directory harms nothing.
pub fn prune(dir: &Path, keep: usize) -> Result<(), Error> {
    let steps = list(dir)?;
    let complete: Vec<u64> = steps.iter().filter(|s| s.1).map(|s| s.0).collect();
    let Some(&newest) = complete.last() else {
        return Ok(());
    };
    let oldest_kept = complete[complete.len().saturating_sub(keep)];
    for (step, is_complete) in steps {
        let stale = if is_complete {
            step < oldest_kept
        } else {
            step < newest
        };
        if stale {
            let path = step_dir(dir, step);
            if let Err(e) = fs::remove_dir_all(&path) {
                eprintln!("warning: cannot remove {}: {e}", path.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> State {
        let shape = Shape {
            features: 2,
            hidden: 3,
            classes: 2,
        };
        let mut model = Model::init(shape, 5);
        // Values that only survive a bit-exact format.
        model.params[0] = 0.1 + 0.2;
        model.params[1] = -0.0;
        model.params[2] = f64::MIN_POSITIVE / 3.0;
        State {
            step,
            model,
            settings: Settings {
                seed: 5,
                lr: 0.1,
                batch_size: 8,
                data_fingerprint: 42,
            },
        }
    }

    fn bits(s: &State) -> Vec<u64> {
        s.model.params.iter().map(|p| p.to_bits()).collect()
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let s = state(12);
        let back = decode(&encode(&s)).expect("decodes");
        assert_eq!(bits(&back), bits(&s));
        assert_eq!((back.step, back.settings), (s.step, s.settings));
    }

    #[test]
    fn decode_rejects_damage() {
        let text = encode(&state(3));
        assert!(decode("").is_err());
        assert!(decode(&text[..text.len() / 2]).is_err());
        assert!(decode(&text.replace("end\n", "")).is_err());
        assert!(decode(&text.replace("params 17", "params 16")).is_err());
        assert!(decode(&text.replace("step 3", "step x")).is_err());
        assert!(decode("garbage\n").is_err());
    }

    #[test]
    fn save_load_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert_eq!(load_newest(d).expect("load"), None);
        for step in [10, 20, 30] {
            assert!(save(d, &state(step)).expect("save"));
        }
        assert!(
            !save(d, &state(30)).expect("exists"),
            "complete dirs are immutable"
        );
        // Debris: an incomplete newer step and a garbage one; a foreign name.
        fs::create_dir_all(d.join("40")).expect("mkdir");
        fs::create_dir_all(d.join("50")).expect("mkdir");
        fs::write(d.join("50").join(STATE_FILE), "garbage").expect("write");
        fs::create_dir_all(d.join("0031")).expect("mkdir");
        fs::write(d.join("0031").join(COMPLETE_MARKER), "").expect("write");
        assert_eq!(load_newest(d).expect("load").map(|s| s.step), Some(30));
        // A complete but unreadable checkpoint falls back to the previous one.
        fs::create_dir_all(d.join("35")).expect("mkdir");
        fs::write(d.join("35").join(COMPLETE_MARKER), "").expect("write");
        assert_eq!(load_newest(d).expect("load").map(|s| s.step), Some(30));
        fs::remove_dir_all(d.join("35")).expect("rm");

        fs::create_dir_all(d.join("25")).expect("mkdir");
        prune(d, 2).expect("prune");
        assert_eq!(complete_steps(d).expect("list"), [20, 30]);
        assert!(!d.join("25").exists(), "older debris is removed");
        assert!(d.join("40").exists() && d.join("0031").exists());

        // Saving over debris replaces it.
        assert!(save(d, &state(50)).expect("save"));
        assert_eq!(load_newest(d).expect("load").map(|s| s.step), Some(50));
    }
}
