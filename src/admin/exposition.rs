//! `/metrics` in the format the scraper asks for.
//!
//! prometheus-client writes OpenMetrics text only. Prometheus and most
//! scrapers that send no `Accept` (curl, older agents) expect the classic
//! text format 0.0.4, where a counter's `# TYPE` line names the sample
//! (`wsgate_handshakes_total`), not the family (`wsgate_handshakes`), and
//! there is no `# EOF` or `# UNIT`. No maintained crate converts a
//! prometheus-client registry to 0.0.4, so [`to_prometheus_text`] rewrites
//! the few lines that differ; the samples are the same in both formats.

/// The media type of OpenMetrics text, as prometheus-client writes it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero `q`).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let refused = params.any(|param| {
                param
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// OpenMetrics text → Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP line comes before its TYPE line, which says whether
    // the name needs `_total`; so HELP waits for TYPE.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (sample_name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                // 0.0.4 has neither; both are gauges there.
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_owned(), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((help_name, text)) = help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {sample_name} {text}\n"));
                }
            }
            out.push_str(&format!("# TYPE {sample_name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_sample_names_and_eof_goes() {
        let openmetrics = "# HELP wsgate_handshakes WebSocket handshakes.\n\
            # TYPE wsgate_handshakes counter\n\
            wsgate_handshakes_total{route=\"chat\",outcome=\"upgraded\"} 3\n\
            # HELP wsgate_tunnels_active Open now.\n\
            # TYPE wsgate_tunnels_active gauge\n\
            wsgate_tunnels_active{route=\"chat\"} 1\n\
            # HELP d Latency.\n\
            # TYPE d histogram\n\
            # UNIT d seconds\n\
            d_bucket{le=\"+Inf\"} 1\n\
            d_sum 0.5\n\
            d_count 1\n\
            # EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP wsgate_handshakes_total WebSocket handshakes.\n\
            # TYPE wsgate_handshakes_total counter\n\
            wsgate_handshakes_total{route=\"chat\",outcome=\"upgraded\"} 3\n\
            # HELP wsgate_tunnels_active Open now.\n\
            # TYPE wsgate_tunnels_active gauge\n\
            wsgate_tunnels_active{route=\"chat\"} 1\n\
            # HELP d Latency.\n\
            # TYPE d histogram\n\
            d_bucket{le=\"+Inf\"} 1\n\
            d_sum 0.5\n\
            d_count 1\n"
        );
    }

    #[test]
    fn accept_negotiation() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0, text/plain"
        )));
    }
}
