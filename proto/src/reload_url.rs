//! The reload URL a pod names: the webhook checks `tessera.dev/reload-url`
//! and the sidecar parses `--notify-url` with this one parser, so nothing
//! the webhook admits can stop the sidecar at start.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tonic::codegen::http::Uri;

/// `http://127.0.0.1:PORT/PATH` (or `localhost`, `[::1]`): only the pod's
/// own loopback, so a credential rotation cannot be made to call elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadUrl {
    /// Where to connect.
    pub address: SocketAddr,
    /// The request target, e.g. `/-/reload`.
    pub path: String,
}

/// Parses a reload URL.
///
/// # Errors
/// What is wrong with it, in a sentence naming the accepted form.
pub fn parse_reload_url(text: &str) -> Result<ReloadUrl, String> {
    let form = "http://127.0.0.1:PORT/PATH (the pod's own loopback, with a port)";
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("`{}` is not a URL ({e}); write {form}", text.escape_debug()))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "`{}` must start with http://; write {form}",
            text.escape_debug()
        ));
    }
    // `http://127.0.0.1:80@host/` names `host`, whatever it starts with.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "`{}` carries user information (`…@`), which hides the host it calls; write {form}",
            text.escape_debug()
        ));
    }
    let ip: IpAddr = match uri.host() {
        Some("localhost" | "127.0.0.1") => Ipv4Addr::LOCALHOST.into(),
        Some("[::1]") => Ipv6Addr::LOCALHOST.into(),
        _ => {
            return Err(format!(
                "`{}` must name 127.0.0.1, localhost or [::1]; write {form}",
                text.escape_debug()
            ));
        }
    };
    let port = uri
        .port_u16()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("`{}` must name a port; write {form}", text.escape_debug()))?;
    Ok(ReloadUrl {
        address: SocketAddr::new(ip, port),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pods_loopback_with_a_port() {
        let url = parse_reload_url("http://127.0.0.1:9090/-/reload").unwrap();
        assert_eq!(url.address, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(url.path, "/-/reload");
        assert_eq!(parse_reload_url("http://[::1]:8080").unwrap().path, "/");
        for bad in [
            "http://127.0.0.1:80@host:8080/",
            "http://user@127.0.0.1:80/",
            "https://127.0.0.1:9090/",
            "http://10.0.0.1:9090/",
            "http://127.0.0.1/",
            "http://127.0.0.1:0/",
            "http://127.0.0.1.evil.example:80/",
        ] {
            assert!(parse_reload_url(bad).is_err(), "{bad}");
        }
    }
}
