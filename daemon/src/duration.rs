//! Durations written for people: `500ms`, `5s`, `2m`, `1h 30m` (humantime's syntax), or plain
//! seconds (`7`).
//!
//! # Usage
//! ```
//! use std::time::Duration;
//! use quva_daemon::duration::parse_positive;
//! assert_eq!(parse_positive("250ms"), Ok(Duration::from_millis(250)));
//! assert_eq!(parse_positive("7"), Ok(Duration::from_secs(7)));
//! assert!(parse_positive("0s").is_err());
//! ```

use std::time::Duration;

/// Parses a positive duration: plain digits are seconds, anything else is humantime's syntax
/// (`ms`, `s`, `m`/`min`, `h`, `d`, combined as in `1h 30m`). Fits clap's `value_parser`.
///
/// # Errors
/// A message naming the text for anything else, and for a zero duration.
pub fn parse_positive(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("invalid duration {s:?}: too large"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("invalid duration {s:?} ({e}): use e.g. 500ms, 5s, 2m"))?
    };
    if d.is_zero() {
        return Err("the duration must be positive".to_owned());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_plain_seconds() {
        assert_eq!(parse_positive("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_positive("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_positive("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_positive("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_positive(" 7 "), Ok(Duration::from_secs(7)));
        assert_eq!(parse_positive("1h 30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_zero_garbage_and_overflow() {
        for bad in [
            "0",
            "0s",
            "",
            "5 parsecs",
            "-5s",
            "s",
            "99999999999999999999999",
        ] {
            assert!(parse_positive(bad).is_err(), "{bad:?}");
        }
    }
}
