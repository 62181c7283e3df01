//! The `[publish]` section of the daemon's configuration file: where `memaflow publish`
//! sends results (docs/publish.md). Parsed here so that the daemon accepts (and type-checks)
//! the section it does not use, and validated into ready values once: a topic template
//! into its parts, paths made absolute, durations checked.
//!
//! A build without the `publish` feature still validates the section (a file written for
//! a full build must not fail on the firmware), but nothing reads the validated values:
//! they are dead there, and only there.
#![cfg_attr(not(feature = "publish"), allow(dead_code))]

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_PORT: u16 = 1883;
const DEFAULT_TLS_PORT: u16 = 8883;
const DEFAULT_TOPIC: &str = "memaflow/{device}/{model}";
const DEFAULT_KEEP: usize = 100_000;
const DEFAULT_RETRY_MAX_SECS: f64 = 60.0;
const DEFAULT_KEEPALIVE_SECS: u64 = 30;
/// MQTT's limit on a topic's length in bytes (a 16-bit length prefix).
const MAX_TOPIC_BYTES: usize = 65_535;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    host: Option<String>,
    port: Option<u16>,
    topic: Option<String>,
    device: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    keep: Option<usize>,
    retry_max_secs: Option<f64>,
    keepalive_secs: Option<u64>,
    metrics: Option<PathBuf>,
}

/// Where and how results are published.
#[derive(Clone, Debug)]
pub(crate) struct PublishConfig {
    pub host: String,
    pub port: u16,
    pub topic: TopicTemplate,
    /// `{device}` in the topic; `None`: the host name, read when the publisher starts.
    pub(crate) device: Option<String>,
    /// `None`: `memaflow-` and the device name.
    pub(crate) client_id: Option<String>,
    pub(crate) credentials: Option<Credentials>,
    pub tls: Option<TlsFiles>,
    /// At most this many results wait unsent; beyond it the oldest are dropped.
    pub keep: usize,
    /// The longest wait between two connection attempts (the backoff doubles up to it).
    pub(crate) retry_max: Duration,
    pub(crate) keepalive: Duration,
    /// The publisher's Prometheus text file (node_exporter's textfile collector), if any.
    pub metrics: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub password: Password,
}

/// Given inline or read from a file when the publisher starts (so the file may be readable
/// by the publisher alone).
#[derive(Clone)]
pub(crate) enum Password {
    None,
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Password::None => f.write_str("None"),
            Password::Inline(_) => f.write_str("Inline(..)"),
            Password::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// TLS is on when a CA file is given; a client certificate is optional.
#[derive(Clone, Debug)]
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    /// Certificate chain and private key, PEM.
    pub(crate) client: Option<(PathBuf, PathBuf)>,
}

/// A topic with `{device}` and `{model}` placeholders, checked once: no wildcards, no
/// unknown placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TopicTemplate {
    parts: Vec<TopicPart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TopicPart {
    Text(String),
    Device,
    Model,
}

impl TopicTemplate {
    pub fn parse(text: &str) -> Result<TopicTemplate> {
        ensure!(!text.is_empty(), "the topic is empty");
        ensure!(
            !text.contains(['+', '#']) && !text.chars().any(char::is_control),
            "the topic '{text}' has a wildcard (+, #) or a control character"
        );
        let mut parts = vec![];
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TopicPart::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .with_context(|| format!("the topic '{text}' has a '{{' without '}}'"))?;
            parts.push(match &rest[open + 1..open + close] {
                "device" => TopicPart::Device,
                "model" => TopicPart::Model,
                other => bail!("the topic '{text}' has {{{other}}}: use {{device}} and {{model}}"),
            });
            rest = &rest[open + close + 1..];
        }
        ensure!(
            !rest.contains('}'),
            "the topic '{text}' has a '}}' without '{{'"
        );
        if !rest.is_empty() {
            parts.push(TopicPart::Text(rest.to_string()));
        }
        Ok(TopicTemplate { parts })
    }

    /// Whether each model of a result gets its own message.
    pub(crate) fn per_model(&self) -> bool {
        self.parts.contains(&TopicPart::Model)
    }

    /// The topic for `device` and `model` (`model` is ignored without `{model}`). Names
    /// are made topic-safe: `/`, wildcards and control characters become `_`, so a name
    /// can neither add a level nor match a subscription it should not.
    pub(crate) fn render(&self, device: &str, model: &str) -> String {
        let mut topic = String::new();
        for part in &self.parts {
            match part {
                TopicPart::Text(t) => topic.push_str(t),
                TopicPart::Device => push_level(&mut topic, device),
                TopicPart::Model => push_level(&mut topic, model),
            }
        }
        truncate_utf8(&mut topic, MAX_TOPIC_BYTES);
        topic
    }
}

fn push_level(topic: &mut String, name: &str) {
    if name.is_empty() {
        topic.push('_');
    }
    topic.extend(name.chars().map(|c| match c {
        '/' | '+' | '#' => '_',
        c if c.is_control() => '_',
        c => c,
    }));
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl RawPublish {
    /// The validated section; relative paths are taken from `base`.
    pub(super) fn validate(self, base: &Path) -> Result<PublishConfig> {
        let host = self.host.context("publish.host is required")?;
        ensure!(
            !host.is_empty() && !host.chars().any(|c| c.is_whitespace() || c.is_control()),
            "publish.host '{host}' is not a host name or address"
        );
        let path = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let client = match (self.client_cert, self.client_key) {
            (Some(c), Some(k)) => Some((path(c), path(k))),
            (None, None) => None,
            _ => bail!("publish.client_cert and publish.client_key go together"),
        };
        let tls = match self.ca_file {
            Some(ca) => Some(TlsFiles {
                ca: path(ca),
                client,
            }),
            None if client.is_some() => {
                bail!("publish.client_cert needs publish.ca_file (TLS)")
            }
            None => None,
        };
        let password = match (self.password, self.password_file) {
            (Some(p), None) => Password::Inline(p),
            (None, Some(f)) => Password::File(path(f)),
            (None, None) => Password::None,
            (Some(_), Some(_)) => bail!("give publish.password or publish.password_file, not both"),
        };
        let credentials = match self.username {
            Some(username) => Some(Credentials { username, password }),
            None if !matches!(password, Password::None) => {
                bail!("publish.password needs publish.username")
            }
            None => None,
        };
        let retry_max = self.retry_max_secs.unwrap_or(DEFAULT_RETRY_MAX_SECS);
        ensure!(
            retry_max.is_finite() && (0.1..=3600.0).contains(&retry_max),
            "publish.retry_max_secs must be between 0.1 and 3600"
        );
        let keepalive = self.keepalive_secs.unwrap_or(DEFAULT_KEEPALIVE_SECS);
        ensure!(
            (5..=3600).contains(&keepalive),
            "publish.keepalive_secs must be between 5 and 3600"
        );
        let keep = self.keep.unwrap_or(DEFAULT_KEEP);
        ensure!(keep >= 1, "publish.keep must be at least 1");
        if let Some(d) = &self.device {
            ensure!(!d.is_empty(), "publish.device is empty");
        }
        let metrics = self.metrics.map(path);
        if let Some(m) = &metrics {
            ensure!(
                m.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(".prom")),
                "publish.metrics must name a file ending in .prom (node_exporter reads only those)"
            );
        }
        let topic = TopicTemplate::parse(self.topic.as_deref().unwrap_or(DEFAULT_TOPIC))
            .context("publish.topic")?;
        Ok(PublishConfig {
            port: self.port.unwrap_or(if tls.is_some() {
                DEFAULT_TLS_PORT
            } else {
                DEFAULT_PORT
            }),
            host,
            topic,
            device: self.device,
            client_id: self.client_id,
            credentials,
            tls,
            keep,
            retry_max: Duration::from_secs_f64(retry_max),
            keepalive: Duration::from_secs(keepalive),
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PublishConfig> {
        let raw: RawPublish = toml::from_str(text)?;
        raw.validate(Path::new("/etc/memaflow"))
    }

    #[test]
    fn defaults_and_every_key() {
        let c = parse("host = \"broker\"").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("broker", 1883));
        assert!(c.tls.is_none() && c.credentials.is_none() && c.device.is_none());
        assert!(c.topic.per_model());
        assert_eq!(c.topic.render("pi", "face"), "memaflow/pi/face");
        assert_eq!(
            (c.keep, c.retry_max.as_secs(), c.keepalive.as_secs()),
            (100_000, 60, 30)
        );

        let c = parse(
            r#"host = "10.0.0.2"
            topic = "fleet/{device}/results"
            device = "kitchen"
            client_id = "cam-7"
            username = "u"
            password_file = "secret"
            ca_file = "/etc/ssl/ca.pem"
            client_cert = "c.pem"
            client_key = "k.pem"
            keep = 10
            retry_max_secs = 2.5
            keepalive_secs = 10"#,
        )
        .unwrap();
        assert_eq!(c.port, 8883, "TLS's port by default");
        assert!(!c.topic.per_model());
        assert_eq!(
            c.topic.render("kitchen", "ignored"),
            "fleet/kitchen/results"
        );
        assert_eq!(c.device.as_deref(), Some("kitchen"));
        assert_eq!(c.client_id.as_deref(), Some("cam-7"));
        let cred = c.credentials.unwrap();
        assert_eq!(cred.username, "u");
        assert!(
            matches!(cred.password, Password::File(p) if p == Path::new("/etc/memaflow/secret"))
        );
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca, Path::new("/etc/ssl/ca.pem"));
        assert_eq!(
            tls.client,
            Some(("/etc/memaflow/c.pem".into(), "/etc/memaflow/k.pem".into()))
        );
        assert_eq!(
            (c.keep, c.retry_max.as_millis(), c.keepalive.as_secs()),
            (10, 2500, 10)
        );
        let c = parse("host = \"b\"\nusername = \"u\"\npassword = \"p\"\nport = 1999").unwrap();
        assert_eq!(c.port, 1999);
        assert!(matches!(c.credentials.unwrap().password, Password::Inline(p) if p == "p"));
    }

    #[test]
    fn bad_sections_are_refused() {
        for bad in [
            "",
            "host = \"\"",
            "host = \"a b\"",
            "host = \"b\"\nport = 70000",
            "host = \"b\"\nsurprise = 1",
            "host = \"b\"\ntopic = \"a/#\"",
            "host = \"b\"\ntopic = \"a/+/b\"",
            "host = \"b\"\ntopic = \"a/{frame}\"",
            "host = \"b\"\ntopic = \"a/{device\"",
            "host = \"b\"\ntopic = \"a/device}\"",
            "host = \"b\"\ntopic = \"\"",
            "host = \"b\"\npassword = \"p\"",
            "host = \"b\"\nusername = \"u\"\npassword = \"p\"\npassword_file = \"f\"",
            "host = \"b\"\nclient_cert = \"c\"\nclient_key = \"k\"",
            "host = \"b\"\nca_file = \"ca\"\nclient_cert = \"c\"",
            "host = \"b\"\nkeep = 0",
            "host = \"b\"\nretry_max_secs = 0",
            "host = \"b\"\nkeepalive_secs = 1",
            "host = \"b\"\ndevice = \"\"",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad:?}");
        }
    }

    #[test]
    fn the_yocto_layers_publish_fragment_and_unit() {
        let config = concat!(
            include_str!("../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow.toml"),
            include_str!(
                "../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow-publish.toml"
            )
        )
        .replace("@MEMAFLOW_PUBLISH_HOST@", "mqtt.local");
        let c = super::super::config::PublisherConfig::parse(&config, Path::new("/etc/memaflow"))
            .unwrap();
        assert_eq!(c.spool_root, Path::new(super::super::config::DEFAULT_SPOOL));
        assert_eq!(
            (c.publish.host.as_str(), c.publish.port),
            ("mqtt.local", 1883)
        );
        let unit = include_str!(
            "../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow-publish.service"
        );
        let exec = format!(
            "ExecStart=/usr/bin/memaflow publish --config {}",
            super::super::config::DEFAULT_CONFIG
        );
        assert!(unit.lines().any(|l| l == exec), "{exec}");
        assert!(unit.lines().any(|l| l == "Type=notify"));
        assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    }

    #[test]
    fn names_cannot_break_the_topic() {
        let t = TopicTemplate::parse("m/{device}/{model}/r").unwrap();
        assert_eq!(t.render("a/b", "x+#y\n\u{1b}"), "m/a_b/x__y__/r");
        assert_eq!(t.render("", "é"), "m/_/é/r");
        let long = "é".repeat(40_000);
        let topic = t.render("d", &long);
        assert!(topic.len() <= MAX_TOPIC_BYTES && topic.starts_with("m/d/é"));
    }
}
