//! JSON bodies, one builder per sink kind.

use serde_json::{Map, Value, json};

use super::{Notification, Severity};

/// The Alertmanager alert name of a rollback, firing and resolving alike (labels are the alert's identity).
pub(crate) const ROLLBACK_ALERT: &str = "SluiceRolloutRolledBack";

/// Discord rejects longer `content` (2000) and embed `description` (4096) fields.
const DISCORD_CONTENT_MAX: usize = 2000;
const DISCORD_DESCRIPTION_MAX: usize = 4096;

/// `<namespace>/<rollout> <reason>`, the headline every chat sink shows.
fn title(n: &Notification) -> String {
    format!("{}/{} {}", n.namespace, n.rollout, n.reason)
}

/// Colour as `RRGGBB`: green, amber, red.
fn rgb(severity: Severity) -> u32 {
    match severity {
        Severity::Info => 0x2E_B8_86,
        Severity::Warn => 0xDA_A0_38,
        Severity::Error => 0xA3_00_2D,
    }
}

/// At most `max` characters of `s`, with `…` as the last one when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

pub(crate) fn slack(n: &Notification, channel: Option<&str>, username: Option<&str>) -> Value {
    let color = match n.severity {
        Severity::Info => "good",
        Severity::Warn => "warning",
        Severity::Error => "danger",
    };
    let fields: Vec<Value> = n
        .revision
        .iter()
        .map(|r| json!({"title": "Revision", "value": r, "short": true}))
        .collect();
    let mut body = Map::new();
    if let Some(channel) = channel {
        body.insert("channel".into(), channel.into());
    }
    if let Some(username) = username {
        body.insert("username".into(), username.into());
    }
    body.insert(
        "text".into(),
        format!("Rollout {}/{}: {}", n.namespace, n.rollout, n.reason).into(),
    );
    body.insert(
        "attachments".into(),
        json!([{
            "color": color,
            "title": title(n),
            "text": n.message,
            "fields": fields,
            "footer": "sluice",
        }]),
    );
    Value::Object(body)
}

pub(crate) fn msteams(n: &Notification) -> Value {
    let mut facts = vec![
        json!({"name": "Namespace", "value": n.namespace}),
        json!({"name": "Rollout", "value": n.rollout}),
        json!({"name": "Reason", "value": n.reason}),
        json!({"name": "Severity", "value": n.severity.as_str()}),
    ];
    if let Some(revision) = &n.revision {
        facts.push(json!({"name": "Revision", "value": revision}));
    }
    facts.push(json!({"name": "At", "value": n.at}));
    json!({
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "themeColor": format!("{:06X}", rgb(n.severity)),
        "summary": title(n),
        "sections": [{
            "activityTitle": title(n),
            "facts": facts,
            "text": n.message,
        }],
    })
}

pub(crate) fn discord(n: &Notification, username: Option<&str>) -> Value {
    let mut embed = json!({
        "title": title(n),
        "description": truncate(&n.message, DISCORD_DESCRIPTION_MAX),
        "color": rgb(n.severity),
        "timestamp": n.at,
    });
    if let (Some(revision), Some(embed)) = (&n.revision, embed.as_object_mut()) {
        embed.insert(
            "fields".into(),
            json!([{"name": "Revision", "value": revision, "inline": true}]),
        );
    }
    let mut body = Map::new();
    if let Some(username) = username {
        body.insert("username".into(), username.into());
    }
    body.insert(
        "content".into(),
        truncate(
            &format!("**{}/{}** {}", n.namespace, n.rollout, n.reason),
            DISCORD_CONTENT_MAX,
        )
        .into(),
    );
    body.insert("embeds".into(), json!([embed]));
    Value::Object(body)
}

pub(crate) fn google_chat(n: &Notification) -> Value {
    let mut text = format!(
        "*{}/{}* {} ({})\n{}",
        n.namespace,
        n.rollout,
        n.reason,
        n.severity.as_str(),
        n.message
    );
    if let Some(revision) = &n.revision {
        text.push_str(&format!("\nRevision: {revision}"));
    }
    json!({ "text": text })
}

/// The notification's own camelCase JSON plus `"source": "sluice"`. Written out field by field (a test keeps it
/// equal to the `Serialize` output) so that building it cannot fail.
pub(crate) fn webhook(n: &Notification) -> Value {
    json!({
        "id": n.id,
        "namespace": n.namespace,
        "rollout": n.rollout,
        "reason": n.reason,
        "severity": n.severity.as_str(),
        "message": n.message,
        "revision": n.revision,
        "at": n.at,
        "resolves": n.resolves,
        "source": "sluice",
    })
}

pub(crate) fn alertmanager(n: &Notification) -> Value {
    let mut labels = Map::new();
    labels.insert("alertname".into(), ROLLBACK_ALERT.into());
    labels.insert("namespace".into(), n.namespace.clone().into());
    labels.insert("rollout".into(), n.rollout.clone().into());
    labels.insert("severity".into(), n.severity.as_str().into());
    if let Some(revision) = &n.revision {
        labels.insert("revision".into(), revision.clone().into());
    }
    let summary = if n.resolves {
        format!(
            "{}/{} recovered from its rollback: {}",
            n.namespace, n.rollout, n.reason
        )
    } else {
        format!("{}/{} was rolled back", n.namespace, n.rollout)
    };
    let mut alert = Map::new();
    alert.insert("labels".into(), Value::Object(labels));
    alert.insert(
        "annotations".into(),
        json!({"summary": summary, "description": n.message, "reason": n.reason}),
    );
    alert.insert("startsAt".into(), n.at.clone().into());
    if n.resolves {
        alert.insert("endsAt".into(), n.at.clone().into());
    }
    Value::Array(vec![Value::Object(alert)])
}
