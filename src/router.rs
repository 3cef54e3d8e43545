//! Route choice: routes that name a `host` beat routes without one; among
//! those, the longest path prefix matching on a segment boundary wins.

use crate::config::RouteConfig;

/// `Host` without port, lower-case, without a trailing dot; IPv6 literals keep
/// their brackets.
pub fn normalise_request_host(host: &str) -> String {
    let without_port = if host.starts_with('[') {
        host.split_once(']')
            .map(|(inside, _)| &host[..inside.len() + 1])
            .unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(name, _)| name).unwrap_or(host)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// `/ws` matches `/ws`, `/ws/` and `/ws/x`, never `/wsx`.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Index, in `routes`' order, of the route for `host` (already normalised)
/// and `path`.
pub fn route<'a>(
    routes: impl IntoIterator<Item = &'a RouteConfig>,
    host: &str,
    path: &str,
) -> Option<usize> {
    routes
        .into_iter()
        .enumerate()
        .filter(|(_, route)| route.host.as_deref().is_none_or(|wanted| wanted == host))
        .filter(|(_, route)| path_matches(&route.path, path))
        // On a tie the earlier route wins, as `check` refuses exact duplicates anyway.
        .max_by_key(|(index, route)| {
            (
                route.host.is_some(),
                route.path.len(),
                std::cmp::Reverse(*index),
            )
        })
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::config::Config;

    fn routes(toml_routes: &str) -> Vec<Arc<RouteConfig>> {
        let text = format!(
            "[[listener]]\naddr = \"127.0.0.1:0\"\n[upstream.u]\nservers = [\"127.0.0.1:1\"]\n{toml_routes}"
        );
        Config::parse(&text, std::path::Path::new("."))
            .unwrap()
            .routes
    }

    fn chosen(routes: &[Arc<RouteConfig>], host: &str, path: &str) -> Option<String> {
        route(
            routes.iter().map(|route| &**route),
            &normalise_request_host(host),
            path,
        )
        .map(|index| routes[index].name.clone())
    }

    #[test]
    fn longest_prefix_on_segment_boundary_wins() {
        let table = routes(
            "[[route]]\npath = \"/\"\nupstream = \"u\"\nname = \"root\"\n\
             [[route]]\npath = \"/ws\"\nupstream = \"u\"\nname = \"ws\"\n\
             [[route]]\npath = \"/ws/admin/\"\nupstream = \"u\"\nname = \"admin\"\n",
        );
        assert_eq!(chosen(&table, "x", "/ws").as_deref(), Some("ws"));
        assert_eq!(chosen(&table, "x", "/ws/").as_deref(), Some("ws"));
        assert_eq!(chosen(&table, "x", "/ws/room").as_deref(), Some("ws"));
        assert_eq!(chosen(&table, "x", "/wsx").as_deref(), Some("root"));
        assert_eq!(chosen(&table, "x", "/ws/admin").as_deref(), Some("admin"));
        assert_eq!(chosen(&table, "x", "/ws/adminx").as_deref(), Some("ws"));
    }

    #[test]
    fn host_routes_beat_hostless_ones_and_ignore_case_and_port() {
        let table = routes(
            "[[route]]\npath = \"/ws/deep\"\nupstream = \"u\"\nname = \"any\"\n\
             [[route]]\nhost = \"API.example.com\"\npath = \"/\"\nupstream = \"u\"\nname = \"api\"\n",
        );
        assert_eq!(
            chosen(&table, "api.EXAMPLE.com:8443", "/ws/deep").as_deref(),
            Some("api")
        );
        assert_eq!(
            chosen(&table, "api.example.com.", "/x").as_deref(),
            Some("api")
        );
        assert_eq!(
            chosen(&table, "other.example.com", "/ws/deep").as_deref(),
            Some("any")
        );
        assert_eq!(chosen(&table, "other.example.com", "/x"), None);
    }

    #[test]
    fn request_host_normalisation() {
        assert_eq!(normalise_request_host("[::1]:8443"), "[::1]");
        assert_eq!(normalise_request_host("[::1]"), "[::1]");
        assert_eq!(normalise_request_host("Example.COM."), "example.com");
    }
}
