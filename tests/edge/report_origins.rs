//! `origin_mode = "report"` through a running proxy: would-be origin
//! rejections (forbidden, missing, duplicated) are let through and counted in
//! `wsgate_origin_reports_total`; the checks after the origin still apply.

use crate::support::*;

const REPORTS: &str = "wsgate_origin_reports_total";

on_both_paths!(report_mode_lets_bad_origins_through_and_counts_them);

async fn report_mode_lets_bad_origins_through_and_counts_them(path: UpgradePath) {
    let keys = Keys::generate();
    let mut backend = spawn_ws_echo().await;
    let toml = format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{backend}"]

        [[route]]
        path = "/report"
        upstream = "echo"
        origins = ["https://app.edge.test"]
        origin_mode = "report"

        [[route]]
        path = "/enforce"
        upstream = "echo"
        origins = ["https://app.edge.test"]

        [[route]]
        path = "/report-auth"
        upstream = "echo"
        origins = ["https://app.edge.test"]
        origin_mode = "report"
        [route.auth]
        jwt_secret_file = "secret.txt"
        {warmup}
        "#,
        backend = backend.addr,
        warmup = warmup_config().await,
    );
    let proxy = start_proxy_in(&toml, keys.path()).await;
    let addr = proxy.addr();
    let admin = proxy.admin.unwrap();
    let reports =
        |metrics: &str, route: &str| metric(metrics, REPORTS, &[("route", route)]).unwrap_or(0.0);

    // An allowed origin is no report.
    let (head, _) = upgrade_via(
        path,
        addr,
        "/report",
        &[("Origin", "https://app.edge.test")],
    )
    .await;
    assert_eq!(head.status, 101);
    backend.next_request().await;
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(reports(&metrics, "/report"), 0.0);

    // Forbidden: through, byte for byte, and counted.
    let (head, body) = upgrade_via(
        path,
        addr,
        "/report",
        &[("Origin", "https://EVIL.example:443")],
    )
    .await;
    assert_eq!(head.status, 101, "{body}");
    assert_eq!(header_values(&head, "wsgate-reason"), Vec::<String>::new());
    let seen = backend.next_request().await;
    assert_eq!(seen.all("origin"), ["https://EVIL.example:443"]);
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(reports(&metrics, "/report"), 1.0);

    // Missing (missing_origin defaults to "reject"): through and counted.
    let (head, _) = upgrade_via(path, addr, "/report", &[]).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        backend.next_request().await.all("origin"),
        Vec::<String>::new()
    );
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(reports(&metrics, "/report"), 2.0);

    // Two Origin values: through and counted.
    let (head, _) = upgrade_via(
        path,
        addr,
        "/report",
        &[
            ("Origin", "https://app.edge.test"),
            ("Origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(head.status, 101);
    backend.next_request().await;

    // The same origins are refused where the mode is "enforce".
    let (head, body) = upgrade_via(
        path,
        addr,
        "/enforce",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_reject(&head, &body, 403, "origin-forbidden");
    let (head, body) = upgrade_via(path, addr, "/enforce", &[]).await;
    assert_reject(&head, &body, 403, "origin-missing");

    // Report mode skips only the origin check: the token is still required.
    let (head, body) = upgrade_via(
        path,
        addr,
        "/report-auth",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_reject(&head, &body, 401, "token-missing");
    let bearer = format!("Bearer {}", keys.hs(&good_claims("reported")));
    let (head, _) = upgrade_via(
        path,
        addr,
        "/report-auth",
        &[
            ("Origin", "https://evil.example"),
            ("Authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(head.status, 101);
    backend.next_request().await;

    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(reports(&metrics, "/report"), 3.0);
    assert_eq!(reports(&metrics, "/enforce"), 0.0);
    assert_eq!(reports(&metrics, "/report-auth"), 2.0);
    let rejections = |route: &str, reason: &str| {
        metric(
            &metrics,
            "wsgate_rejections_total",
            &[("route", route), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(rejections("/report", "origin-forbidden"), 0.0);
    assert_eq!(rejections("/report", "origin-missing"), 0.0);
    assert_eq!(rejections("/enforce", "origin-forbidden"), 1.0);
    assert_eq!(rejections("/enforce", "origin-missing"), 1.0);
    assert_eq!(rejections("/report-auth", "token-missing"), 1.0);
    let upgraded = [("route", "/report"), ("outcome", "upgraded")];
    assert_eq!(
        metric(&metrics, "wsgate_handshakes_total", &upgraded),
        Some(4.0)
    );

    assert_backend_idle(&mut backend);
    proxy.stop().await;
}
