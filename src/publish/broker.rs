//! The broker as rumqttc sees it: connection options, credentials and TLS (rustls on
//! ring), read and checked once at start so that a missing CA file or a bad key is a
//! start-up error, not a retry loop.

use crate::spool::publish_config::{Password, PublishConfig};
use anyhow::{Context, Result, bail};
use rumqttc::{ConnectionError, MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Messages handed to the connection and not yet acknowledged, at most. rumqttc's own
/// packet-id window is larger (`PACKET_IDS`), so ids are never reused while in flight.
pub(crate) const WINDOW: usize = 64;
const PACKET_IDS: u16 = 1024;
/// Results can hold every output value (`report = "raw"`).
const MAX_OUTGOING_PACKET: usize = 64 << 20;
const MAX_INCOMING_PACKET: usize = 64 << 10;
const CONNECT_TIMEOUT_SECS: u64 = 10;

pub(crate) struct Broker {
    pub options: MqttOptions,
    /// `host:port`, for messages.
    pub name: String,
    pub(crate) connect_timeout_secs: u64,
}

impl Broker {
    pub fn new(config: &PublishConfig, device: &str) -> Result<Broker> {
        let name = format!("{}:{}", config.host, config.port);
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("memaflow-{device}"));
        let mut options = MqttOptions::new(client_id, config.host.clone(), config.port);
        options
            .set_keep_alive(config.keepalive)
            .set_clean_session(true)
            .set_inflight(PACKET_IDS)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
        if let Some(c) = &config.credentials {
            let password = match &c.password {
                Password::None => String::new(),
                Password::Inline(p) => p.clone(),
                Password::File(path) => read_password(path)?,
            };
            options.set_credentials(c.username.clone(), password);
        }
        if let Some(tls) = &config.tls {
            options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
                client_config(&tls.ca, tls.client.as_ref())?,
            ))));
        }
        Ok(Broker {
            options,
            name,
            connect_timeout_secs: CONNECT_TIMEOUT_SECS,
        })
    }

    /// A connection failure as one line that names the broker and says what to check.
    pub(crate) fn describe(&self, e: &ConnectionError) -> String {
        let hint = match e {
            ConnectionError::ConnectionRefused(code) => format!(
                "the broker refused the connection ({code:?}): check publish.username and the password"
            ),
            ConnectionError::Tls(e) => {
                format!("TLS failed: {e} (check publish.ca_file and the broker's certificate)")
            }
            ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "nothing listens there (connection refused)".into()
            }
            ConnectionError::NetworkTimeout => "no answer within the connection timeout".into(),
            e => e.to_string(),
        };
        format!("MQTT broker {}: {hint}", self.name)
    }
}

fn read_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading publish.password_file {}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Trusts only `ca` (not the system's roots: the broker of a fleet has its own CA).
fn client_config(
    ca: &Path,
    client: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca).context("publish.ca_file")? {
        roots
            .add(cert)
            .with_context(|| format!("publish.ca_file {}: not a CA certificate", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    Ok(match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert).context("publish.client_cert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                anyhow::anyhow!(
                    "publish.client_key {}: no private key in PEM ({e})",
                    key.display()
                )
            })?;
            builder.with_client_auth_cert(chain, key).context(
                "publish.client_cert and publish.client_key do not make a client identity",
            )?
        }
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: cannot read PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}
