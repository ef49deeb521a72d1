//! Plain HTTP(S) helpers for the admin endpoints and the webhook.

use super::*;

/// The first sample of metric `name` (followed by its labels or a space)
/// whose line holds `label` ("" for any) on the `/metrics` of the admin
/// endpoints at `admin_url`; `None` when there is none.
pub async fn metric_value(admin_url: &str, name: &str, label: &str) -> Option<f64> {
    let (_, text) = http_get(&format!("{admin_url}/metrics")).await;
    text.lines()
        .find(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
                && line.contains(label)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// How many requests of `operation` (vaultrs' name of the endpoint, e.g.
/// `ReadSecretRequest`) the broker whose admin endpoints are at
/// `admin_url` has sent Vault.
pub async fn vault_requests(admin_url: &str, operation: &str) -> f64 {
    metric_value(
        admin_url,
        "tessera_vault_request_duration_seconds_count",
        &format!("operation=\"{operation}\""),
    )
    .await
    .unwrap_or_default()
}

/// A plain HTTP/1.1 GET: (status code, body). Enough for the admin endpoints.
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url, "http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    parse_response(&response)
}

/// `(host:port, /path)` of a URL with `scheme`.
fn split_url<'a>(url: &'a str, scheme: &str) -> (&'a str, String) {
    let rest = url
        .strip_prefix(scheme)
        .unwrap_or_else(|| panic!("a {scheme} URL: {url}"));
    rest.split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")))
}

/// The status and body of an HTTP/1.1 response read to its end.
fn parse_response(response: &[u8]) -> (u16, String) {
    let response = String::from_utf8_lossy(response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// POSTs JSON over HTTPS (HTTP/1.1), trusting the CA in `ca`; returns the
/// status and the body.
pub async fn https_post(url: &str, ca: &Path, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url, "https://");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("usable CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    // A server may close without close_notify; what arrived is the answer.
    let _ = stream.read_to_end(&mut response).await;
    parse_response(&response)
}
