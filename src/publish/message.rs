//! A result as MQTT messages: one message with the result file as it is, or, when the
//! topic has `{model}`, one per model with the result narrowed to that model.

use crate::spool::publish_config::TopicTemplate;
use anyhow::{Context, Result};
use serde_json::Value;

#[derive(Debug, PartialEq)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The messages for one result. The payload is the daemon's JSON: names in it are JSON
/// strings, so no frame name can break the message (the topic holds no frame name).
pub fn messages(topic: &TopicTemplate, device: &str, result: Vec<u8>) -> Result<Vec<Message>> {
    if !topic.per_model() {
        return Ok(vec![Message {
            topic: topic.render(device, ""),
            payload: result,
        }]);
    }
    let mut whole: Value = serde_json::from_slice(&result).context("the result is not JSON")?;
    let models = match whole.get_mut("models").map(Value::take) {
        Some(Value::Array(models)) if !models.is_empty() => models,
        _ => anyhow::bail!("the result has no models"),
    };
    models
        .into_iter()
        .map(|model| {
            let name = model
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            whole["models"] = Value::Array(vec![model]);
            Ok(Message {
                topic: topic.render(device, &name),
                payload: serde_json::to_vec(&whole)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULT: &str = r#"{"frame": "caf\u00e9\n.png", "models": [
        {"name": "face", "outputs": [1.5]}, {"name": "a/b+c", "error": {"stage": "package"}}],
        "time_ms": {"total": 2.0}}"#;

    #[test]
    fn one_message_per_model_or_the_result_as_it_is() {
        let per_model = TopicTemplate::parse("m/{device}/{model}").unwrap();
        let m = messages(&per_model, "pi", RESULT.as_bytes().to_vec()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].topic.as_str(), m[1].topic.as_str()),
            ("m/pi/face", "m/pi/a_b_c")
        );
        let v: Value = serde_json::from_slice(&m[1].payload).unwrap();
        assert_eq!(v["frame"], "café\n.png", "the frame name survives exactly");
        assert_eq!(v["models"].as_array().unwrap().len(), 1);
        assert_eq!(v["models"][0]["name"], "a/b+c");
        assert_eq!(v["time_ms"]["total"], 2.0);

        let whole = TopicTemplate::parse("m/{device}").unwrap();
        let m = messages(&whole, "pi", RESULT.as_bytes().to_vec()).unwrap();
        assert_eq!(
            m,
            [Message {
                topic: "m/pi".into(),
                payload: RESULT.as_bytes().to_vec()
            }]
        );
        assert!(messages(&per_model, "pi", b"{\"models\": []}".to_vec()).is_err());
    }
}
