//! Where budget alerts go (`domain::budget::alerts::BudgetAlert`): published
//! to the SNS topic `BUDGET_ALERT_TOPIC_ARN` names (its subscribers —
//! e-mail, an HTTPS webhook — are template.yaml's), or, without one, logged
//! as a warning (target `budget_alert`). The only module that uses the SNS
//! SDK; its client is built on the first alert, so a relay that never
//! sends one never loads it.

use std::sync::Arc;

use aws_sdk_sns::types::MessageAttributeValue;
use tokio::sync::OnceCell;

use crate::config::AlertTarget;
use crate::domain::budget::alerts::BudgetAlert;
use crate::domain::format_timestamp;

/// Cheap to clone; the clones share the client.
#[derive(Clone)]
pub struct AlertPublisher(Arc<Sink>);

enum Sink {
    Log,
    Topic {
        arn: String,
        endpoint: Option<String>,
        client: OnceCell<aws_sdk_sns::Client>,
    },
}

impl AlertPublisher {
    pub fn new(target: &AlertTarget) -> AlertPublisher {
        AlertPublisher(Arc::new(match &target.topic_arn {
            None => Sink::Log,
            Some(arn) => Sink::Topic {
                arn: arn.clone(),
                endpoint: target.sns_endpoint.clone(),
                client: OnceCell::new(),
            },
        }))
    }

    /// Alerts only logged (no topic configured).
    pub fn log_only() -> AlertPublisher {
        AlertPublisher(Arc::new(Sink::Log))
    }

    /// Sends `alert`: one SNS message (the event's JSON; a short subject; the
    /// attribute `threshold_percent`, for subscription filter policies), or
    /// a log line when no topic is configured.
    pub async fn publish(&self, alert: &BudgetAlert) -> anyhow::Result<()> {
        match &*self.0 {
            Sink::Log => {
                log_alert(alert);
                Ok(())
            }
            Sink::Topic {
                arn,
                endpoint,
                client,
            } => {
                let client = client.get_or_init(|| sns_client(endpoint.as_deref())).await;
                let threshold = MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value(alert.threshold_percent.to_string())
                    .build()?;
                client
                    .publish()
                    .topic_arn(arn)
                    .subject(alert.subject())
                    .message(alert.to_json().to_string())
                    .message_attributes("threshold_percent", threshold)
                    .send()
                    .await
                    .map_err(|err| {
                        anyhow::Error::msg(aws_sdk_sns::error::DisplayErrorContext(err).to_string())
                    })?;
                Ok(())
            }
        }
    }
}

async fn sns_client(endpoint: Option<&str>) -> aws_sdk_sns::Client {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let mut config = aws_sdk_sns::config::Builder::from(&sdk);
    if let Some(endpoint) = endpoint {
        config = config.endpoint_url(endpoint);
    }
    aws_sdk_sns::Client::from_conf(config.build())
}

/// The event as log fields (no secret, no request content: the key's id
/// and name, the limit and the amounts).
pub fn log_alert(alert: &BudgetAlert) {
    tracing::warn!(
        target: "budget_alert",
        key_id = %alert.key_id,
        key_name = alert.key_name.as_deref().unwrap_or(""),
        window = alert.limit.window.name(),
        models = alert.limit.models.as_deref().unwrap_or("*"),
        threshold_percent = alert.threshold_percent,
        limit_micro_usd = alert.limit.limit,
        used_micro_usd = alert.used,
        period = %alert.counter.period,
        resets_at = alert.resets_at.map(format_timestamp).unwrap_or_default(),
        time_zone = %alert.time_zone,
        "{}",
        alert.subject()
    );
}
