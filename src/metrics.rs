//! Prometheus metrics, names and labels as the contract fixes them.
//!
//! Per-route handles are created once per config (prometheus-client metrics
//! are shared atomics behind an `Arc`), so the per-handshake and per-tunnel
//! paths never build a label set; only rare events (a rejection reason, an
//! HTTP status) look their series up by label.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    route: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    route: String,
    from: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerStateLabels {
    upstream: String,
    server: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    route: String,
    status: u16,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~16 s: a loopback handshake to a slow backend behind TLS.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Every metric family; one per process, shared across config reloads so
/// counters survive a SIGHUP.
pub struct Metrics {
    registry: Registry,
    handshakes: Family<OutcomeLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    tunnels_active: Family<RouteLabel, Gauge>,
    tunnel_bytes: Family<DirectionLabels, Counter>,
    tunnels_closed: Family<CauseLabels, Counter>,
    tunnel_closes: Family<CloseLabels, Counter>,
    messages: Family<DirectionLabels, Counter>,
    frame_tracking_lost: Family<RouteLabel, Counter>,
    handshake_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    http_requests: Family<StatusLabels, Counter>,
    origin_reports: Family<RouteLabel, Counter>,
    upstream_servers: Family<ServerStateLabels, Gauge>,
    /// The (upstream, server) pairs `upstream_servers` has series for, so a
    /// reload can drop the series of servers no longer configured: a server
    /// removed while down would otherwise stay "down" for alerts forever.
    known_servers: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    reloads: Family<ResultLabel, Counter>,
    tls_handshake_failures: Family<ListenerLabel, Counter>,
    upstream_refusals: Family<StatusLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let handshakes = Family::default();
        let rejections = Family::default();
        let tunnels_active = Family::default();
        let tunnel_bytes = Family::default();
        let tunnels_closed = Family::default();
        let tunnel_closes = Family::default();
        let messages = Family::default();
        let frame_tracking_lost = Family::default();
        let handshake_duration =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let http_requests = Family::default();
        let origin_reports = Family::default();
        let upstream_servers = Family::default();
        let reloads: Family<ResultLabel, Counter> = Family::default();
        let build_info: Family<VersionLabel, Gauge> = Family::default();
        let tls_handshake_failures = Family::default();
        let upstream_refusals = Family::default();
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "wsgate_handshakes",
            "WebSocket handshakes by outcome",
            handshakes.clone(),
        );
        registry.register(
            "wsgate_rejections",
            "Requests refused at the edge, by reason code",
            rejections.clone(),
        );
        registry.register(
            "wsgate_tunnels_active",
            "WebSocket tunnels open now",
            tunnels_active.clone(),
        );
        registry.register(
            "wsgate_tunnel_bytes",
            "Bytes spliced through tunnels",
            tunnel_bytes.clone(),
        );
        registry.register(
            "wsgate_tunnels_closed",
            "Tunnels ended, by cause",
            tunnels_closed.clone(),
        );
        registry.register(
            "wsgate_tunnel_closes",
            "Tunnels ended, by the first Close frame's code and sender (from=\"none\", code=\"1006\": no Close frame either way)",
            tunnel_closes.clone(),
        );
        registry.register(
            "wsgate_messages",
            "WebSocket data messages through tunnels",
            messages.clone(),
        );
        registry.register(
            "wsgate_frame_tracking_lost",
            "Tunnels whose bytes stopped being valid WebSocket framing (passed on unfollowed)",
            frame_tracking_lost.clone(),
        );
        registry.register(
            "wsgate_handshake_duration_seconds",
            "Time from request head to the 101 being sent",
            handshake_duration.clone(),
        );
        registry.register(
            "wsgate_http_requests",
            "Plain HTTP requests by response status",
            http_requests.clone(),
        );
        registry.register(
            "wsgate_origin_reports",
            "Would-be origin rejections let through by origin_mode = \"report\"",
            origin_reports.clone(),
        );
        registry.register(
            "wsgate_upstream_servers",
            "Upstream servers by state, 1 for the current one: up = in rotation by both active and passive health",
            upstream_servers.clone(),
        );
        registry.register(
            "wsgate_reloads",
            "Config reloads (SIGHUP), by result",
            reloads.clone(),
        );
        registry.register(
            "wsgate_build_info",
            "Always 1; the running wsgate's version as a label",
            build_info.clone(),
        );
        registry.register(
            "wsgate_tls_handshake_failures",
            "TLS handshakes that failed or timed out (a client that does not trust the certificate, a scanner), by listener",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "wsgate_upstream_refusals",
            "Upgrades the backend answered with something other than 101, by that status",
            upstream_refusals.clone(),
        );
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Both results exist from the start, so a rate() over them works
        // before the first reload.
        for result in ["ok", "failed"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        Arc::new(Metrics {
            registry,
            handshakes,
            rejections,
            tunnels_active,
            tunnel_bytes,
            tunnels_closed,
            tunnel_closes,
            messages,
            frame_tracking_lost,
            handshake_duration,
            http_requests,
            origin_reports,
            upstream_servers,
            known_servers: Default::default(),
            reloads,
            tls_handshake_failures,
            upstream_refusals,
        })
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn tls_handshake_failed(&self, listener: String) {
        self.tls_handshake_failures
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// The `up`/`down` pair of one upstream server.
    pub fn upstream_server(&self, upstream: &str, server: &str) -> ServerGauge {
        if let Ok(mut known) = self.known_servers.lock() {
            known.insert((upstream.to_owned(), server.to_owned()));
        }
        let gauge = |state| {
            self.upstream_servers
                .get_or_create(&ServerStateLabels {
                    upstream: upstream.to_owned(),
                    server: server.to_owned(),
                    state,
                })
                .clone()
        };
        ServerGauge {
            up: gauge("up"),
            down: gauge("down"),
        }
    }

    /// Drops the server series `keep` rejects (servers a reload removed).
    pub fn retain_upstream_servers(&self, keep: impl Fn(&str, &str) -> bool) {
        let Ok(mut known) = self.known_servers.lock() else {
            return;
        };
        known.retain(|(upstream, server)| {
            if keep(upstream, server) {
                return true;
            }
            for state in ["up", "down"] {
                self.upstream_servers.remove(&ServerStateLabels {
                    upstream: upstream.clone(),
                    server: server.clone(),
                    state,
                });
            }
            false
        });
    }

    /// OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    pub fn route(self: &Arc<Self>, route: &str) -> RouteMetrics {
        let name = route.to_owned();
        let outcome = |outcome| {
            self.handshakes
                .get_or_create(&OutcomeLabels {
                    route: name.clone(),
                    outcome,
                })
                .clone()
        };
        let direction = |family: &Family<DirectionLabels, Counter>, direction| {
            family
                .get_or_create(&DirectionLabels {
                    route: name.clone(),
                    direction,
                })
                .clone()
        };
        let label = RouteLabel {
            route: name.clone(),
        };
        RouteMetrics {
            upgraded: outcome("upgraded"),
            rejected: outcome("rejected"),
            upstream_error: outcome("upstream_error"),
            tunnels_active: self.tunnels_active.get_or_create(&label).clone(),
            bytes_to_upstream: direction(&self.tunnel_bytes, "client_to_upstream"),
            bytes_to_client: direction(&self.tunnel_bytes, "upstream_to_client"),
            messages_to_upstream: direction(&self.messages, "client_to_upstream"),
            messages_to_client: direction(&self.messages, "upstream_to_client"),
            frame_tracking_lost: self.frame_tracking_lost.get_or_create(&label).clone(),
            handshake_duration: self.handshake_duration.get_or_create(&label).clone(),
            origin_reports: self.origin_reports.get_or_create(&label).clone(),
            family: self.clone(),
            name,
        }
    }
}

/// One upstream server's state series: 1 on the current state, 0 on the other.
#[derive(Clone)]
pub struct ServerGauge {
    up: Gauge,
    down: Gauge,
}

impl ServerGauge {
    pub fn set(&self, up: bool) {
        self.up.set(i64::from(up));
        self.down.set(i64::from(!up));
    }
}

/// The series of one route, ready to bump.
#[derive(Clone)]
pub struct RouteMetrics {
    pub upgraded: Counter,
    pub rejected: Counter,
    pub upstream_error: Counter,
    pub tunnels_active: Gauge,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    pub messages_to_upstream: Counter,
    pub messages_to_client: Counter,
    pub frame_tracking_lost: Counter,
    pub handshake_duration: Histogram,
    pub origin_reports: Counter,
    family: Arc<Metrics>,
    name: String,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteMetrics({})", self.name)
    }
}

impl RouteMetrics {
    pub fn rejection(&self, reason: &'static str) {
        self.family
            .rejections
            .get_or_create(&ReasonLabels {
                route: self.name.clone(),
                reason,
            })
            .inc();
    }

    /// The backend answered an upgrade with `status`, not 101.
    pub fn upstream_refusal(&self, status: u16) {
        self.family
            .upstream_refusals
            .get_or_create(&StatusLabels {
                route: self.name.clone(),
                status,
            })
            .inc();
    }

    pub fn http_status(&self, status: u16) {
        self.family
            .http_requests
            .get_or_create(&StatusLabels {
                route: self.name.clone(),
                status,
            })
            .inc();
    }

    /// A tunnel that ended for `cause`, its closing handshake begun by
    /// `from` with `code` (`"none"`, 1006 without one).
    pub fn tunnel_closed(&self, cause: &'static str, from: &'static str, code: u16) {
        self.family
            .tunnels_closed
            .get_or_create(&CauseLabels {
                route: self.name.clone(),
                cause,
            })
            .inc();
        self.family
            .tunnel_closes
            .get_or_create(&CloseLabels {
                route: self.name.clone(),
                from,
                code,
            })
            .inc();
    }
}
