//! Property: a `https://*.example.com` pattern allows exactly the hosts that
//! end in `.example.com` with at least one non-empty label in front — never
//! anything outside it.

use proptest::prelude::*;
use wsgate::policy::origin::{OriginPattern, is_allowed};

/// Labels that make near misses likely: the pattern's own labels, pieces of
/// them, empty labels, and random ones.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("example".to_owned()),
        Just("com".to_owned()),
        Just("EXAMPLE".to_owned()),
        Just("xexample".to_owned()),
        Just("examplecom".to_owned()),
        Just(String::new()),
        "[a-zA-Z0-9-]{1,8}",
        "[a-z@:/_*]{1,3}",
    ]
}

fn host() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..6).prop_map(|labels| labels.join("."))
}

/// The specification, written independently of the matcher.
fn expected(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let Some(front) = host.strip_suffix(".example.com") else {
        return false;
    };
    !front.is_empty()
        && front.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn wildcard_allows_only_real_subdomains(host in host(), port in prop_oneof![Just(""), Just(":443"), Just(":8443")]) {
        let patterns = vec![OriginPattern::parse("https://*.example.com").unwrap()];
        let origin = format!("https://{host}{port}");
        let allowed = is_allowed(&patterns, &origin);
        let want = expected(&host) && port != ":8443";
        if allowed {
            // The safety half: nothing outside the pattern, ever.
            prop_assert!(want, "{origin:?} was allowed but is outside https://*.example.com");
        }
        prop_assert_eq!(allowed, want, "{:?}", origin);
        // Another scheme never matches.
        let http_origin = format!("http://{host}{port}");
        prop_assert!(!is_allowed(&patterns, &http_origin));
    }
}
