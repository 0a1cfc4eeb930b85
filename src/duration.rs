//! Human-readable durations for configuration files: `"500ms"`, `"5s"`, `"5m"`, `"2h"`, `"7d"`, or
//! a bare integer number of seconds (`"30"`).

use std::time::Duration;

use serde::Deserialize as _;

/// Parses a duration written as an integer with an optional unit suffix: `ms`, `s`, `m`, `h`,
/// `d`; no suffix means seconds. The error message quotes the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || {
        format!(
            "invalid duration {text:?} (expected e.g. \"500ms\", \"5s\", \"5m\", \"2h\", \"7d\")"
        )
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let seconds = |factor: u64| n.checked_mul(factor).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => None,
    }
    .ok_or_else(bad)
}

/// Serde helper (`#[serde(deserialize_with = "crate::duration::deserialize")]`) accepting the
/// strings [`parse_duration`] accepts, or an integer number of seconds.
pub fn deserialize<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(n) => Ok(Duration::from_secs(n)),
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "s",
            "5x",
            "5 s",
            "-5s",
            "1.5s",
            "5sec",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{:?}", bad.trim())), "{bad}: {err}");
        }
        assert!(
            parse_duration("300000000000000d").is_err(),
            "overflow must be an error"
        );
    }

    #[test]
    fn serde_accepts_strings_and_integers() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "deserialize")]
            d: Duration,
        }
        let t: T = toml::from_str("d = \"2h\"").unwrap();
        assert_eq!(t.d, Duration::from_secs(7200));
        let t: T = toml::from_str("d = 7").unwrap();
        assert_eq!(t.d, Duration::from_secs(7));
        let err = toml::from_str::<T>("d = \"7y\"").err().unwrap().to_string();
        assert!(err.contains("invalid duration \"7y\""), "{err}");
    }
}
