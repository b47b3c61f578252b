//! The results table: one row per (scenario, metric), gateway against one peer,
//! medians of interleaved runs and the ratio that says who is ahead.

use std::fmt::Write as _;

/// Whether a bigger or a smaller number is better for a metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Better {
    Higher,
    Lower,
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: &'static str,
    pub better: Better,
    /// Every run's value for the gateway and the peer (interleaved runs).
    pub gateway: Vec<f64>,
    pub peer: Vec<f64>,
    pub peer_name: String,
}

impl Row {
    /// How far ahead the gateway is: above 1 the gateway is better, below 1 the peer.
    /// For times it is peer/gateway, for rates gateway/peer, so all rows read the same way.
    pub fn advantage(&self) -> f64 {
        let (g, p) = (median(&self.gateway), median(&self.peer));
        let ratio = match self.better {
            Better::Higher => g / p,
            Better::Lower => p / g,
        };
        if ratio.is_finite() {
            ratio
        } else {
            f64::NAN
        }
    }
}

/// Median; the mean of the two middle values for an even count.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn number(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The table as Markdown, then the slowest ratio named.
pub fn render(rows: &[Row], notes: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | metric | gateway | peer | peer value | gateway advantage |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | --- | ---: | ---: |");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} ({}, n={}) | {} | {} | {} | {}x |",
            r.scenario,
            r.metric,
            r.unit,
            r.gateway.len().min(r.peer.len()),
            number(median(&r.gateway)),
            r.peer_name,
            number(median(&r.peer)),
            number(r.advantage()),
        );
    }
    let _ = writeln!(
        out,
        "\ngateway advantage: peer/gateway for times and sizes, gateway/peer for rates; \
         above 1 the gateway is ahead, below 1 it is behind. Values are medians."
    );
    if let Some(worst) = rows
        .iter()
        .filter(|r| r.advantage().is_finite())
        .min_by(|a, b| a.advantage().total_cmp(&b.advantage()))
    {
        let _ = writeln!(
            out,
            "slowest ratio: {} / {} vs {}: {}x",
            worst.scenario,
            worst.metric,
            worst.peer_name,
            number(worst.advantage())
        );
    }
    for n in notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}
