//! Training data: finding the CSV, parsing it strictly, and generating a synthetic one.
//!
//! CSV format: a header row, numeric feature columns, and the class label last: either
//! integers `0..k-1` or class names, which are numbered in sorted order. Fields are
//! split on commas (no quoted commas); surrounding spaces and double quotes are
//! trimmed; blank lines are skipped. Every problem is reported with the file and line.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::rng::{self, Stream};

/// More classes than this is almost surely a regression target or an id column.
const MAX_CLASSES: usize = 1000;
/// How deep below RESPAWN_INPUT_DIR to look for a CSV (inputs are staged as
/// `<dir>/<name>` or, for prefixes, `<dir>/<prefix>/...`).
const SEARCH_DEPTH: usize = 2;

#[derive(Debug, Clone)]
pub struct Dataset {
    pub rows: usize,
    pub features: usize,
    /// Row-major, standardised per column (zero mean, unit variance) so that one
    /// default learning rate suits any data set.
    pub x: Vec<f64>,
    pub labels: Vec<usize>,
    pub class_names: Vec<String>,
    /// FNV-1a of the file's bytes, recorded in checkpoints to warn when the data
    /// changed between attempts.
    pub fingerprint: u64,
}

impl Dataset {
    pub fn row(&self, r: usize) -> &[f64] {
        &self.x[r * self.features..(r + 1) * self.features]
    }

    pub fn classes(&self) -> usize {
        self.class_names.len()
    }

    /// A data set from already-numeric parts (used by unit tests).
    #[cfg(test)]
    pub fn from_parts(features: usize, x: Vec<f64>, labels: Vec<usize>, classes: usize) -> Self {
        Dataset {
            rows: labels.len(),
            features,
            x,
            labels,
            class_names: (0..classes).map(|c| c.to_string()).collect(),
            fingerprint: 0,
        }
    }
}

/// The CSV to train on: `--data` if given (a relative path that is not found is
/// looked up under the input dir, where respawn stages inputs), else the first
/// `*.csv` under the input dir, shallowest first, then by path.
pub fn locate(data_flag: Option<&Path>, input_dir: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(path) = data_flag {
        let staged = input_dir
            .filter(|_| path.is_relative() && !path.exists())
            .map(|d| d.join(path));
        return Ok(staged.unwrap_or_else(|| path.to_path_buf()));
    }
    let Some(dir) = input_dir else {
        return Err(Error::input(
            "no training data: pass --data FILE or set RESPAWN_INPUT_DIR",
        ));
    };
    let mut found = Vec::new();
    find_csvs(dir, 0, &mut found)?;
    found.sort();
    found
        .into_iter()
        .next()
        .map(|(_, path)| path)
        .ok_or_else(|| {
            Error::input(format!(
                "no *.csv file in {} (searched {SEARCH_DEPTH} levels of subdirectories)",
                dir.display()
            ))
        })
}

/// Collects `(depth, path)` of every CSV file at most `SEARCH_DEPTH` levels below
/// `dir`. Hidden entries (`.name`) are skipped: they are caches, not inputs.
fn find_csvs(dir: &Path, depth: usize, found: &mut Vec<(usize, PathBuf)>) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, &e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            if depth < SEARCH_DEPTH {
                find_csvs(&path, depth + 1, found)?;
            }
        } else if path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"))
        {
            found.push((depth, path));
        }
    }
    Ok(())
}

/// Reads and parses the CSV at `path`.
pub fn load(path: &Path) -> Result<Dataset, Error> {
    let bytes = fs::read(path).map_err(|e| Error::io("cannot read", path, &e))?;
    parse(&bytes).map_err(|(line, msg)| match line {
        Some(n) => Error::input(format!("{}: line {n}: {msg}", path.display())),
        None => Error::input(format!("{}: {msg}", path.display())),
    })
}

/// A parse error: the 1-based line, when there is one, and the message.
type ParseError = (Option<usize>, String);

/// Parses CSV bytes into a standardised data set.
pub fn parse(bytes: &[u8]) -> Result<Dataset, ParseError> {
    let mut lines = text_lines(bytes);
    let (_, header) = lines
        .next()
        .transpose()?
        .ok_or((None, "the file is empty".to_string()))?;
    let columns = header.split(',').count();
    if columns < 2 {
        return Err((
            Some(1),
            "the header needs at least one feature column and a label column".into(),
        ));
    }
    let features = columns - 1;
    let mut x = Vec::new();
    let mut raw_labels = Vec::new();
    for line in lines {
        let (n, text) = line?;
        let fields: Vec<&str> = text.split(',').map(clean).collect();
        if fields.len() != columns {
            let msg = format!(
                "expected {columns} fields like the header, found {}",
                fields.len()
            );
            return Err((Some(n), msg));
        }
        for (c, field) in fields[..features].iter().enumerate() {
            x.push(parse_number(field).map_err(|m| (Some(n), format!("column {}: {m}", c + 1)))?);
        }
        raw_labels.push((n, fields[features].to_string()));
    }
    if raw_labels.is_empty() {
        return Err((None, "no data rows after the header".into()));
    }
    let (labels, class_names) = number_classes(&raw_labels)?;
    standardise(&mut x, features)?;
    Ok(Dataset {
        rows: labels.len(),
        features,
        x,
        labels,
        class_names,
        fingerprint: fnv1a(bytes),
    })
}

/// Non-blank lines as `(1-based number, text)`, without `\r` or a UTF-8 BOM.
fn text_lines(bytes: &[u8]) -> impl Iterator<Item = Result<(usize, &str), ParseError>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            std::str::from_utf8(line)
                .map(|text| (i + 1, text))
                .map_err(|_| (Some(i + 1), "not valid UTF-8".to_string()))
        })
        .filter(|line| !matches!(line, Ok((_, text)) if text.trim().is_empty()))
}

fn clean(field: &str) -> &str {
    let field = field.trim();
    field
        .strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(field)
        .trim()
}

fn parse_number(field: &str) -> Result<f64, String> {
    match field.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{field:?} is not a finite number")),
    }
}

/// Class indices and names: integer labels are used as they are (`k` = max + 1);
/// otherwise the distinct names are numbered in sorted order.
fn number_classes(raw: &[(usize, String)]) -> Result<(Vec<usize>, Vec<String>), ParseError> {
    if let Some((n, _)) = raw.iter().find(|(_, l)| l.is_empty()) {
        return Err((Some(*n), "empty class label".into()));
    }
    let as_ints: Option<Vec<usize>> = raw.iter().map(|(_, l)| l.parse().ok()).collect();
    if let Some(ints) = as_ints {
        let (i, &max) = ints
            .iter()
            .enumerate()
            .max_by_key(|&(_, v)| v)
            .unwrap_or((0, &0));
        if max >= MAX_CLASSES {
            let msg = format!("class label {max} is too large (at most {MAX_CLASSES} classes)");
            return Err((Some(raw[i].0), msg));
        }
        let names = (0..=max).map(|c| c.to_string()).collect();
        return Ok((ints, names));
    }
    let names: Vec<String> = raw
        .iter()
        .map(|(_, l)| l.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if names.len() > MAX_CLASSES {
        return Err((
            None,
            format!("more than {MAX_CLASSES} distinct class labels"),
        ));
    }
    let labels = raw
        .iter()
        .map(|(_, l)| names.binary_search(l).unwrap_or_default())
        .collect();
    Ok((labels, names))
}

/// Standardises each column in place; constant columns are only centred.
fn standardise(x: &mut [f64], features: usize) -> Result<(), ParseError> {
    let rows = x.len() / features;
    for c in 0..features {
        let mut sum = 0.0;
        for r in 0..rows {
            sum += x[r * features + c];
        }
        let mean = sum / rows as f64;
        let mut sq = 0.0;
        for r in 0..rows {
            let d = x[r * features + c] - mean;
            sq += d * d;
        }
        let sd = (sq / rows as f64).sqrt();
        if !mean.is_finite() || !sd.is_finite() {
            return Err((None, format!("column {}: values too large", c + 1)));
        }
        let scale = if sd > 0.0 { sd } else { 1.0 };
        for r in 0..rows {
            x[r * features + c] = (x[r * features + c] - mean) / scale;
        }
    }
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Class centres of the synthetic data set: three overlapping Gaussian blobs in 4-D.
const CENTRES: [[f64; 4]; 3] = [
    [1.5, 0.0, -1.0, 0.5],
    [-1.0, 1.5, 0.5, -0.5],
    [0.0, -1.5, 1.0, 1.0],
];

/// Writes `rows` rows of the synthetic 3-class data set for `seed`. Noise is the sum
/// of 12 uniforms minus 6 (Irwin-Hall, close to a unit Gaussian) so that the file is
/// byte-identical on every platform: no libm calls.
pub fn generate(rows: usize, seed: u64, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "x1,x2,x3,x4,label")?;
    for r in 0..rows {
        let class = r % CENTRES.len();
        let mut fields = Vec::with_capacity(5);
        for (f, centre) in CENTRES[class].iter().enumerate() {
            let mut noise = -6.0;
            for k in 0..12 {
                let j = (f * 12 + k) as u64;
                noise += rng::unit(rng::draw(seed, Stream::Generate, r as u64, j));
            }
            fields.push(format!("{:.4}", centre + noise));
        }
        fields.push(class.to_string());
        writeln!(out, "{}", fields.join(","))?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_line(csv: &str) -> (Option<usize>, String) {
        err_bytes(csv.as_bytes())
    }

    fn err_bytes(csv: &[u8]) -> (Option<usize>, String) {
        match parse(csv) {
            Ok(_) => panic!("expected an error for {csv:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_integer_and_named_labels() {
        let d = parse(b"a,b,y\n1,2,1\n3,4,0\n\n5,6,2\n").expect("valid");
        assert_eq!((d.rows, d.features, d.classes()), (3, 2, 3));
        assert_eq!(d.labels, [1, 0, 2]);
        let d = parse(b"\xEF\xBB\xBFa,y\r\n1,\"versicolor\"\r\n2, setosa\r\n3,versicolor\r\n")
            .expect("valid");
        assert_eq!(d.class_names, ["setosa", "versicolor"]);
        assert_eq!(d.labels, [1, 0, 1]);
    }

    #[test]
    fn standardises_columns() {
        let d = parse(b"a,b,y\n1,5,0\n3,5,1\n").expect("valid");
        assert_eq!(d.x, [-1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(err_line("a,b,y\n1,2,0\n1,x,1\n").0, Some(3));
        assert!(err_line("a,b,y\n1,2,0\n1,x,1\n").1.contains("column 2"));
        assert_eq!(err_line("a,b,y\n1,2,0\n\n1,2\n").0, Some(4));
        assert_eq!(err_line("a,b,y\n1,inf,0\n").0, Some(2));
        assert_eq!(err_line("a,b,y\n1,2,\n").0, Some(2));
        assert_eq!(err_line("a,y\n1,0\n1,5000\n").0, Some(3));
        assert_eq!(err_bytes(b"a,y\n1,\xff\n").0, Some(2));
        assert_eq!(err_line("y\n1\n").0, Some(1));
        assert_eq!(err_line("a,y\n").0, None);
        assert_eq!(err_line("").0, None);
    }

    #[test]
    fn generated_data_is_deterministic_and_parses() {
        let gen_csv = |seed| {
            let mut out = Vec::new();
            generate(30, seed, &mut out).expect("write to memory");
            out
        };
        assert_eq!(gen_csv(7), gen_csv(7));
        assert_ne!(gen_csv(7), gen_csv(8));
        let d = parse(&gen_csv(7)).expect("valid");
        assert_eq!((d.rows, d.features, d.classes()), (30, 4, 3));
    }

    #[test]
    fn locate_prefers_shallow_then_sorted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
        fs::create_dir_all(root.join(".cache")).expect("mkdir");
        for f in [
            "a/b/c/too-deep.csv",
            ".cache/x.csv",
            "a/b/z.csv",
            "a/y.csv",
            "a/notes.txt",
        ] {
            fs::write(root.join(f), "").expect("write");
        }
        assert_eq!(
            locate(None, Some(root)).expect("found"),
            root.join("a/y.csv")
        );
        fs::write(root.join("top.CSV"), "").expect("write");
        assert_eq!(
            locate(None, Some(root)).expect("found"),
            root.join("top.CSV")
        );
        let flag = Path::new("/elsewhere.csv");
        assert_eq!(locate(Some(flag), Some(root)).expect("flag"), flag);
        assert!(locate(None, None).is_err());
    }
}
