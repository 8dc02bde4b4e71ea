//! Human units in specs: sizes (`16GiB`, `512MB`) and durations (`30m`, `1h 30m`).
//!
//! Both accept a plain number too (bytes, seconds) and serialize back to the human
//! form, so a spec read from the ledger reads like the one the user wrote.
//!
//! Each textual form is defined twice, once as the JSON Schema pattern that
//! `schemas/` publishes ([`SIZE_PATTERN`], [`DURATION_PATTERN`]) and once as the
//! hand-written reader below; the tests hold both to the same verdict. The
//! grammars are deliberately small (no leading zeros, a bounded number of digits,
//! ASCII only) so that every string the pattern admits is a value the reader
//! accepts, and every value a spec can hold serializes back into the pattern.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A positive number of bytes, written `16GiB`, `512 MB`, `1.5TiB` or as a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// A size as text: 1–6 digits without a leading zero (or `0.` and a fraction that is
/// not zero), up to 3 decimals, an optional space, an optional unit (K, M, G, T with
/// an optional `i` for powers of 1024; case-insensitive) and an optional `B`.
pub const SIZE_PATTERN: &str = r"^(?:[1-9][0-9]{0,5}(?:\.[0-9]{1,3})?|0\.(?:[1-9][0-9]{0,2}|0[1-9][0-9]?|00[1-9])) ?(?:[KkMmGgTt][Ii]?)?[Bb]?$";
/// The largest size written as a plain integer (2^60 bytes, an exbibyte); the largest
/// text form, `999999.999TiB`, is below it.
pub const MAX_SIZE_BYTES: u64 = 1 << 60;

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// The text form that [`SIZE_PATTERN`] admits, if this size has one: the largest
    /// binary unit it is a whole multiple of, with at most 6 digits.
    fn text(self) -> Option<String> {
        const UNITS: [(&str, u64); 5] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("B", 1),
        ];
        UNITS
            .into_iter()
            .find(|(_, n)| self.0 >= *n && self.0.is_multiple_of(*n))
            .map(|(unit, n)| (self.0 / n, unit))
            .filter(|(q, _)| *q <= 999_999)
            .map(|(q, unit)| format!("{q}{unit}"))
    }
}

/// Reads a size by [`SIZE_PATTERN`]; fractions of a byte round up, so every size it
/// admits is at least one byte.
fn parse_size(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        &s[start..*i]
    };
    let whole = digits(&mut i);
    let mut frac = "";
    if i < b.len() && b[i] == b'.' {
        i += 1;
        frac = digits(&mut i);
        if frac.is_empty() || frac.len() > 3 {
            return None;
        }
    }
    let leading_zero = whole.len() > 1 && whole.starts_with('0');
    if whole.is_empty() || whole.len() > 6 || leading_zero {
        return None;
    }
    if whole == "0" && !frac.bytes().any(|c| c != b'0') {
        // `0` alone, or `0.` with a zero fraction: no size.
        return None;
    }
    if i < b.len() && b[i] == b' ' {
        i += 1;
    }
    let mut unit: u128 = 1;
    if let Some(c) = b.get(i).map(u8::to_ascii_lowercase)
        && let Some(power) = [b'k', b'm', b'g', b't'].iter().position(|p| *p == c)
    {
        i += 1;
        let binary = b.get(i).is_some_and(|c| c.eq_ignore_ascii_case(&b'i'));
        if binary {
            i += 1;
        }
        let base: u128 = if binary { 1024 } else { 1000 };
        unit = base.pow(power as u32 + 1);
    }
    if b.get(i).is_some_and(|c| c.eq_ignore_ascii_case(&b'b')) {
        i += 1;
    }
    if i != b.len() {
        return None;
    }
    // Thousandths of the number, times the unit, rounded up to whole bytes.
    let whole: u128 = whole.parse().ok()?;
    let frac: u128 = format!("{frac:0<3}").parse().ok()?;
    let thousandths = (whole * 1000 + frac) * unit;
    u64::try_from(thousandths.div_ceil(1000)).ok()
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s)
            .map(ByteSize)
            .ok_or_else(|| format!("expected a size such as 16GiB or 512MB, got {s:?}"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, n) in UNITS {
            if self.0 >= n && self.0.is_multiple_of(n) {
                return write!(f, "{}{unit}", self.0 / n);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // What the ledger and the API show must read back, and match the schema:
        // the text form where there is one, else the plain number of bytes.
        match self.text() {
            Some(text) => s.serialize_str(&text),
            None => s.serialize_u64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "expected a size such as 16GiB, or a number of bytes from 1 to 2^60";
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 16GiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                if (1..=MAX_SIZE_BYTES).contains(&v) {
                    Ok(ByteSize(v))
                } else {
                    Err(E::custom(format!("{EXPECTED}, got {v}")))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                // JSON Schema reads 16.0 as the integer 16; so does this.
                match crate::spec::whole(v) {
                    Some(w) if (1.0..=MAX_SIZE_BYTES as f64).contains(&w) => Ok(ByteSize(w as u64)),
                    _ => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                }
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ByteSize, E> {
                Err(E::custom(format!("{EXPECTED}, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size above zero: a number of bytes, or a number with a unit (16GiB, 512MB, 1.5 TiB).",
            "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": MAX_SIZE_BYTES },
                { "type": "string", "pattern": SIZE_PATTERN }
            ]
        })
    }
}

/// A span of time above zero, written `30m`, `1h 30m`, `90s`, or as a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

/// A duration as text: items of 1–8 digits (no leading zeros) and a unit, an
/// optional space between number and unit and between items, at least one item
/// not zero. With [`MAX_DURATION_TEXT`] characters at most, no sum overflows.
pub const DURATION_PATTERN: &str = concat!(
    "^(?:0 ?",
    "(?:ns|us|ms|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?|M|months?|y|years?)",
    " ?)*[1-9][0-9]{0,7} ?",
    "(?:ns|us|ms|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?|M|months?|y|years?)",
    "(?: ?(?:0|[1-9][0-9]{0,7}) ?",
    "(?:ns|us|ms|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?|M|months?|y|years?)",
    ")*$"
);
/// The longest duration text.
pub const MAX_DURATION_TEXT: usize = 80;
/// The smallest and largest durations written as a number of seconds.
pub const MIN_DURATION_SECS: f64 = 0.001;
pub const MAX_DURATION_SECS: u64 = 100_000_000_000_000_000;

/// The units a duration may be written in, as in `humantime` (which prints them):
/// a month is 30.44 days, a year 365.25 days.
fn unit_nanos(unit: &str) -> Option<u128> {
    const S: u128 = 1_000_000_000;
    Some(match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" | "sec" | "secs" | "second" | "seconds" => S,
        "m" | "min" | "mins" | "minute" | "minutes" => 60 * S,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600 * S,
        "d" | "day" | "days" => 86_400 * S,
        "w" | "week" | "weeks" => 7 * 86_400 * S,
        "M" | "month" | "months" => 2_630_016 * S,
        "y" | "year" | "years" => 31_557_600 * S,
        _ => return None,
    })
}

/// Reads a duration by [`DURATION_PATTERN`].
fn parse_duration(s: &str) -> Option<Duration> {
    if s.chars().count() > MAX_DURATION_TEXT {
        return None;
    }
    let b = s.as_bytes();
    let (mut i, mut nanos, mut first) = (0, 0u128, true);
    loop {
        if !first && b[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let number = &s[start..i];
        if number.is_empty() || number.len() > 8 || (number.len() > 1 && number.starts_with('0')) {
            return None;
        }
        if i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let n: u128 = number.parse().ok()?;
        nanos += n * unit_nanos(&s[start..i])?;
        if i == b.len() {
            break;
        }
        first = false;
    }
    if nanos == 0 {
        return None;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

impl HumanDuration {
    pub fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        HumanDuration(d)
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s)
            .map(HumanDuration)
            .ok_or_else(|| format!("expected a duration such as 30m or 1h30m, got {s:?}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The text form when it reads back (it does but for durations of more than
        // 10^8 years), else the number of seconds.
        let text = self.to_string();
        if parse_duration(&text) == Some(self.0) {
            s.serialize_str(&text)
        } else if self.0.subsec_nanos() == 0 {
            s.serialize_u64(self.0.as_secs())
        } else {
            s.serialize_f64(self.0.as_secs_f64())
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str =
            "expected a duration such as 30m, or a number of seconds from 0.001 to 10^17";
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30m")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                if (1..=MAX_DURATION_SECS).contains(&v) {
                    Ok(HumanDuration::from_secs(v))
                } else {
                    Err(E::custom(format!("{EXPECTED}, got {v}")))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                // The same comparisons a JSON Schema validator makes with the bounds.
                if (MIN_DURATION_SECS..=MAX_DURATION_SECS as f64).contains(&v) {
                    Ok(HumanDuration(Duration::from_secs_f64(v)))
                } else {
                    Err(E::custom(format!("{EXPECTED}, got {v}")))
                }
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<HumanDuration, E> {
                Err(E::custom(format!("{EXPECTED}, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration above zero: a number of seconds, or units such as 30m, 1h 30m, 2d.",
            "oneOf": [
                { "type": "number", "minimum": MIN_DURATION_SECS, "maximum": MAX_DURATION_SECS },
                { "type": "string", "maxLength": MAX_DURATION_TEXT, "pattern": DURATION_PATTERN }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("16GiB".parse::<ByteSize>().map(|b| b.0), Ok(16 << 30));
        assert_eq!("512MB".parse::<ByteSize>().map(|b| b.0), Ok(512_000_000));
        assert_eq!(ByteSize(16 << 30).to_string(), "16GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            "30m".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_secs(1800))
        );
        assert_eq!(
            "1h 30m".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(HumanDuration::from_secs(5400).to_string(), "1h 30m");
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["1KiB", "3GiB", "7B", "5TiB"] {
            let b: ByteSize = s.parse().expect("parses");
            assert_eq!(b.to_string(), s);
        }
    }

    #[test]
    fn sizes_serialize_into_their_pattern() {
        for (bytes, json) in [
            (16u64 << 30, "\"16GiB\""),
            (1000, "\"1000B\""),
            (999_999 << 40, "\"999999TiB\""),
            (1_000_001, "1000001"),
            (MAX_SIZE_BYTES, "1152921504606846976"),
        ] {
            let text = serde_json::to_string(&ByteSize(bytes)).unwrap_or_default();
            assert_eq!(text, json);
            let back: ByteSize = serde_json::from_str(&text).expect("reads back");
            assert_eq!(back.0, bytes);
        }
        assert_eq!("0.5B".parse::<ByteSize>().map(|b| b.0), Ok(1), "rounds up");
        assert_eq!("1.5 kib".parse::<ByteSize>().map(|b| b.0), Ok(1536));
        for bad in [
            "0",
            "0.000GB",
            "05MB",
            "1234567GB",
            "1.2345GB",
            "16 GiB ",
            "1PiB",
            "",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_serialize_into_their_pattern() {
        for d in [
            Duration::from_millis(1),
            Duration::from_secs(7 * 86_400),
            Duration::new(5, 123_456_789),
            Duration::from_secs(99_999_999 * 31_557_600 + 1),
        ] {
            let text = serde_json::to_string(&HumanDuration(d)).unwrap_or_default();
            assert!(text.starts_with('"'), "{d:?} as text: {text}");
            let back: HumanDuration = serde_json::from_str(&text).expect("reads back");
            assert_eq!(back.0, d);
        }
        // Past 10^8 years the text would need 9 digits: the number of seconds instead.
        let big = HumanDuration::from_secs(MAX_DURATION_SECS);
        let text = serde_json::to_string(&big).unwrap_or_default();
        assert_eq!(text, MAX_DURATION_SECS.to_string());
        for bad in [
            "0s",
            "0m 0s",
            "1.5h",
            "01h",
            "1h  2m",
            " 1h",
            "1h ",
            "123456789s",
            "1 fortnight",
        ] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad:?}");
        }
        for good in ["1h30m", "1h 30m", "0s 5m", "5 m", "2days", "1year 2months"] {
            assert!(good.parse::<HumanDuration>().is_ok(), "{good:?}");
        }
    }

    /// The published patterns and the readers agree on strings drawn from the
    /// pattern itself and on strings drawn from the characters they use.
    mod patterns {
        use proptest::prelude::*;

        use super::super::*;

        fn schema_says(schema: &serde_json::Value, s: &str) -> bool {
            let v = jsonschema::validator_for(schema).expect("a valid schema");
            v.is_valid(&serde_json::Value::String(s.to_owned()))
        }

        fn unanchored(p: &str) -> String {
            p.trim_start_matches('^').trim_end_matches('$').to_owned()
        }

        fn size_agrees(s: &str) -> Result<(), TestCaseError> {
            let schema = serde_json::json!({"type": "string", "pattern": SIZE_PATTERN});
            prop_assert_eq!(
                schema_says(&schema, s),
                s.parse::<ByteSize>().is_ok(),
                "{:?}",
                s
            );
            Ok(())
        }

        fn duration_agrees(s: &str) -> Result<(), TestCaseError> {
            let schema = serde_json::json!({"type": "string", "pattern": DURATION_PATTERN, "maxLength": MAX_DURATION_TEXT});
            prop_assert_eq!(
                schema_says(&schema, s),
                s.parse::<HumanDuration>().is_ok(),
                "{:?}",
                s
            );
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            #[test]
            fn sizes_from_the_pattern(s in proptest::string::string_regex(&unanchored(SIZE_PATTERN)).expect("pattern")) {
                size_agrees(&s)?;
            }

            #[test]
            fn sizes_from_their_characters(s in "[0-9 .kKmMgGtTiIbBp]{0,12}") {
                size_agrees(&s)?;
            }

            #[test]
            fn durations_from_the_pattern(s in proptest::string::string_regex(&unanchored(DURATION_PATTERN)).expect("pattern")) {
                duration_agrees(&s)?;
            }

            #[test]
            fn durations_from_their_characters(s in "[0-9 smhdwyMnuoertca]{0,14}") {
                duration_agrees(&s)?;
            }
        }
    }
}
