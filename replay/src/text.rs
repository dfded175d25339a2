//! Formatting for people reading a report at 3 a.m.: durations with units, wall times in UTC, counts with
//! separators, and aligned tables.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A duration in the unit that reads best: `850 µs`, `12.3 ms`, `4.20 s`, `3 min 12 s`.
pub fn duration(ns: u64) -> String {
    let ns_f = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.0} µs", ns_f / 1e3)
    } else if ns < 100_000_000 {
        format!("{:.1} ms", ns_f / 1e6)
    } else if ns < 1_000_000_000 {
        format!("{:.0} ms", ns_f / 1e6)
    } else if ns < 120_000_000_000 {
        format!("{:.2} s", ns_f / 1e9)
    } else {
        let seconds = ns / 1_000_000_000;
        format!("{} min {} s", seconds / 60, seconds % 60)
    }
}

/// An optional duration, `–` when the phase did not happen.
pub fn maybe_duration(ns: Option<u64>) -> String {
    ns.map(duration).unwrap_or_else(|| "–".into())
}

/// A wall-clock time as RFC 3339 in UTC with milliseconds (`2026-11-25T19:15:02.123Z`).
pub fn wall_time(ns: u64) -> String {
    let Ok(at) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)) else {
        return format!("{ns} ns");
    };
    // Fixed width (always milliseconds), so columns of times line up.
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Parses an RFC 3339 time into ns since the epoch.
pub fn parse_wall_time(text: &str) -> Option<u64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos()).ok()
}

/// Parses a span like `90s`, `15m`, `2h`, `1d` (or plain seconds) into ns.
pub fn parse_span(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let count: u64 = digits.parse().ok()?;
    let unit_s = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    count.checked_mul(unit_s)?.checked_mul(1_000_000_000)
}

/// `1234567` → `1,234,567`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if value < 1024 {
        return format!("{value} B");
    }
    let mut scaled = value as f64 / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1} {}", UNITS[unit])
}

/// A plain-text table: a header row, a rule, and rows, each column as wide as its widest cell. Columns whose
/// header starts with a digit-friendly alignment (see [`Table::right`]) are right-aligned.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            right_aligned: vec![false; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the given columns (numbers).
    pub fn right(mut self, columns: &[usize]) -> Table {
        for &column in columns {
            if let Some(flag) = self.right_aligned.get_mut(column) {
                *flag = true;
            }
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (column, cell) in row.iter().enumerate().take(columns) {
                widths[column] = widths[column].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut text = String::new();
            for (column, width) in widths.iter().enumerate() {
                let cell = cells.get(column).map(String::as_str).unwrap_or("");
                let pad = width.saturating_sub(cell.chars().count());
                if column > 0 {
                    text.push_str("  ");
                }
                if self.right_aligned[column] {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    if column + 1 < columns {
                        text.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &self.headers);
        let rule: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
        line(&mut out, &rule);
        for row in &self.rows {
            line(&mut out, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration(850), "850 ns");
        assert_eq!(duration(12_345_678), "12.3 ms");
        assert_eq!(duration(4_200_000_000), "4.20 s");
        assert_eq!(duration(192_000_000_000), "3 min 12 s");
    }

    #[test]
    fn spans_and_times_parse() {
        assert_eq!(parse_span("15m"), Some(900_000_000_000));
        assert_eq!(parse_span("2h"), Some(7_200_000_000_000));
        assert_eq!(parse_span("10"), Some(10_000_000_000));
        assert_eq!(parse_span("ten"), None);
        let ns = parse_wall_time("2026-11-25T19:15:02.123Z").unwrap();
        assert_eq!(wall_time(ns), "2026-11-25T19:15:02.123Z");
        assert_eq!(
            wall_time(ns - 123_000_000 + 540_000_000),
            "2026-11-25T19:15:02.540Z"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(&["phase", "p50"]).right(&[1]);
        table.row(vec!["prefill".into(), "12.3 ms".into()]);
        table.row(vec!["kv".into(), "1 ms".into()]);
        assert_eq!(
            table.render(),
            "phase        p50\n───────  ───────\nprefill  12.3 ms\nkv          1 ms\n"
        );
    }
}
