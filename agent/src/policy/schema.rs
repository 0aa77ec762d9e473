//! The JSON Schema of segment files, for editors and CI (see docs/policy-schema.md).
//!
//! The loader walks the YAML by hand (see [`super::load`]), so the types here are not a
//! parser: they only describe the shape of one YAML document to `schemars`, with SPEC §1's
//! words as descriptions. The loader stays the authority (it also resolves names and checks
//! values a pattern cannot); tests keep these types in step with the keys it accepts and with
//! the committed docs/segward-policy.schema.json.

use schemars::{generate::SchemaSettings, JsonSchema, Schema};

/// One port number, 1-65535.
macro_rules! port {
    () => {
        "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    };
}

/// Names (`name`, device `id`) as SPEC §1 defines them.
macro_rules! name {
    () => {
        "[a-z0-9][a-z0-9._-]{0,62}"
    };
}

/// An IPv4 or IPv6 address or CIDR, loosely: the loader checks the rest.
macro_rules! cidr {
    () => {
        "[0-9A-Fa-f:.]+(/[0-9]{1,3})?"
    };
}

const NAME: &str = concat!("^", name!(), "$");
const TARGET: &str = concat!("^(", name!(), "|", cidr!(), ")$");
const CIDR: &str = concat!("^", cidr!(), "$");
const ADDRESS: &str = "^[0-9A-Fa-f:.]+$";
const MAC: &str = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$";
const PORT_SPEC: &str = concat!(
    "^(",
    port!(),
    "(-",
    port!(),
    ")?/(tcp|udp|sctp)|tcp|udp|sctp|icmp|icmpv6|any)$"
);
const DURATION: &str = "^[0-9]+(ms|s|m|h)$";

/// One YAML document of a segward segment file. A policy is a directory of *.yaml / *.yml
/// files, each holding one or more documents separated by `---`.
#[derive(JsonSchema)]
#[schemars(title = "segward policy document", tag = "kind")]
pub enum Document {
    /// Devices and the flows they may open (`allow`) or accept from outside (`accept`).
    Segment(SegmentDoc),
    /// Named CIDRs: places outside the device network that rules name.
    Zone(ZoneDoc),
    /// What a quarantined device may still open, and when devices are quarantined
    /// automatically. At most one in a policy.
    Quarantine(QuarantineDoc),
}

#[derive(JsonSchema)]
#[schemars(rename = "Segment", deny_unknown_fields)]
pub struct SegmentDoc {
    /// Unique among segments and zones (they share one namespace).
    #[schemars(regex(pattern = NAME))]
    pub name: String,
    /// Free text for people; the agent ignores it.
    pub description: Option<String>,
    /// `enforce` (default) drops what no rule allows; `audit` reports would-be drops as
    /// `audit_deny` events and lets the packets pass.
    pub mode: Option<Mode>,
    /// The devices whose traffic this segment's rules judge.
    pub devices: Option<Vec<DeviceDoc>>,
    /// Flows that this segment's devices may open.
    pub allow: Option<Vec<AllowRuleDoc>>,
    /// Flows that sources outside the device network may open to these devices.
    pub accept: Option<Vec<AcceptRuleDoc>>,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(JsonSchema)]
#[schemars(rename = "Device", deny_unknown_fields)]
pub struct DeviceDoc {
    /// Unique among all devices; not also a segment or zone name.
    #[schemars(regex(pattern = NAME))]
    pub id: String,
    /// When given, the source MAC is enforced (anti-spoofing), and DHCP leases for this MAC
    /// bind their address to the device.
    #[schemars(regex(pattern = MAC))]
    pub mac: Option<String>,
    /// Static IPv4 and/or IPv6 addresses; without them, addresses are learned at run time
    /// (DHCP leases, `segward bind`).
    #[schemars(inner(regex(pattern = ADDRESS)))]
    pub addresses: Option<Vec<String>>,
}

#[derive(JsonSchema)]
#[schemars(rename = "AllowRule", deny_unknown_fields)]
pub struct AllowRuleDoc {
    /// A segment, a device id, a zone, a CIDR, or `gateway`.
    #[schemars(regex(pattern = TARGET))]
    pub to: String,
    /// Required: nothing is allowed implicitly.
    #[schemars(length(min = 1))]
    pub ports: Vec<PortSpecDoc>,
}

#[derive(JsonSchema)]
#[schemars(rename = "AcceptRule", deny_unknown_fields)]
pub struct AcceptRuleDoc {
    /// A zone or a CIDR (never a segment: use that segment's `allow`).
    #[schemars(regex(pattern = TARGET))]
    pub from: String,
    /// Required: nothing is allowed implicitly.
    #[schemars(length(min = 1))]
    pub ports: Vec<PortSpecDoc>,
}

/// `PORT/PROTO`, `LOW-HIGH/PROTO` (PROTO: tcp, udp or sctp), `tcp`, `udp`, `sctp` (any
/// port), `icmp`, `icmpv6`, or `any` (every protocol).
#[derive(JsonSchema)]
#[schemars(rename = "PortSpec", transparent)]
pub struct PortSpecDoc(#[schemars(regex(pattern = PORT_SPEC))] pub String);

#[derive(JsonSchema)]
#[schemars(rename = "Zone", deny_unknown_fields)]
pub struct ZoneDoc {
    /// Unique among segments and zones (they share one namespace).
    #[schemars(regex(pattern = NAME))]
    pub name: String,
    /// IPv4 and/or IPv6 CIDRs (a bare address is a /32 or /128). A zone also covers the
    /// device addresses inside it.
    #[schemars(length(min = 1), inner(regex(pattern = CIDR)))]
    pub cidrs: Vec<String>,
}

#[derive(JsonSchema)]
#[schemars(rename = "Quarantine", deny_unknown_fields)]
pub struct QuarantineDoc {
    /// All that a quarantined device may still open.
    pub allow: Option<Vec<AllowRuleDoc>>,
    /// Automatic quarantine; each trigger is optional.
    pub triggers: Option<TriggersDoc>,
    /// Device ids that triggers never quarantine (manual quarantine still works).
    #[schemars(inner(regex(pattern = NAME)))]
    pub exempt: Option<Vec<String>>,
}

#[derive(JsonSchema)]
#[schemars(rename = "Triggers", deny_unknown_fields)]
pub struct TriggersDoc {
    /// More than `count` denied new flows in `window`.
    pub denied_flows: Option<DeniedFlowsDoc>,
    /// More than `destinations` distinct destination addresses in `window`.
    pub fanout: Option<FanoutDoc>,
}

#[derive(JsonSchema)]
#[schemars(rename = "DeniedFlows", deny_unknown_fields)]
pub struct DeniedFlowsDoc {
    #[schemars(range(min = 1))]
    pub count: u32,
    pub window: DurationDoc,
}

#[derive(JsonSchema)]
#[schemars(rename = "Fanout", deny_unknown_fields)]
pub struct FanoutDoc {
    #[schemars(range(min = 1))]
    pub destinations: u32,
    pub window: DurationDoc,
}

/// A whole number and a unit: `500ms`, `10s`, `2m`, `1h`.
#[derive(JsonSchema)]
#[schemars(rename = "Duration", transparent)]
pub struct DurationDoc(#[schemars(regex(pattern = DURATION))] pub String);

/// The schema of one policy document, in JSON Schema draft 07 (what editors' YAML plugins
/// support most widely).
pub fn policy_schema() -> Schema {
    SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<Document>()
}

/// [`policy_schema`] as committed in docs/segward-policy.schema.json.
pub fn policy_schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&policy_schema()).expect("a schema is plain JSON");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
        path::Path,
    };

    use serde::Deserialize as _;
    use serde_json::Value;

    use super::*;
    use crate::policy::load::{
        load_str, policy_files, ACCEPT_KEYS, ALLOW_KEYS, DENIED_FLOWS_KEYS, DEVICE_KEYS,
        FANOUT_KEYS, KINDS, QUARANTINE_KEYS, SEGMENT_KEYS, TRIGGERS_KEYS, ZONE_KEYS,
    };

    const COMMITTED: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/segward-policy.schema.json"
    );

    fn schema() -> Value {
        policy_schema().to_value()
    }

    fn validator() -> jsonschema::Validator {
        jsonschema::draft7::new(&schema()).expect("the schema compiles")
    }

    /// The documents of a YAML text as JSON values (empty documents left out).
    fn documents(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|doc| serde_yaml::Value::deserialize(doc).expect("valid YAML"))
            .filter(|doc| !doc.is_null())
            .map(|doc| serde_json::to_value(doc).expect("YAML with string keys is JSON"))
            .collect()
    }

    fn keys(object: &Value) -> BTreeSet<&str> {
        object["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    fn set<'a>(keys: &[&'a str]) -> BTreeSet<&'a str> {
        keys.iter().copied().collect()
    }

    #[test]
    fn committed_schema_is_up_to_date() {
        let generated = policy_schema_json();
        if std::env::var_os("SEGWARD_BLESS").is_some() {
            fs::write(COMMITTED, &generated).expect("write the schema");
        }
        let committed = fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/segward-policy.schema.json is missing or stale; regenerate it with \
             `SEGWARD_BLESS=1 cargo test -p segward --lib policy::schema` and commit it"
        );
    }

    #[test]
    fn schema_is_valid_draft_07() {
        jsonschema::draft7::meta::validate(&schema()).expect("a valid draft-07 schema");
    }

    /// The schema names exactly the keys the loader accepts, per kind and per nested mapping,
    /// so that neither can grow a key the other does not know.
    #[test]
    fn schema_keys_match_the_loader() {
        let schema = schema();
        let kinds: BTreeMap<&str, BTreeSet<&str>> = schema["oneOf"]
            .as_array()
            .expect("one schema per kind")
            .iter()
            .map(|v| (v["properties"]["kind"]["const"].as_str().unwrap(), keys(v)))
            .collect();
        let loader_kinds = BTreeMap::from([
            ("Segment", set(SEGMENT_KEYS)),
            ("Zone", set(ZONE_KEYS)),
            ("Quarantine", set(QUARANTINE_KEYS)),
        ]);
        assert_eq!(kinds, loader_kinds);
        assert_eq!(kinds.keys().copied().collect::<BTreeSet<_>>(), set(KINDS));

        let mappings: BTreeMap<&str, BTreeSet<&str>> = schema["definitions"]
            .as_object()
            .expect("definitions")
            .iter()
            .filter(|(_, d)| d["type"] == "object")
            .map(|(name, d)| (name.as_str(), keys(d)))
            .collect();
        let loader_mappings = BTreeMap::from([
            ("Device", set(DEVICE_KEYS)),
            ("AllowRule", set(ALLOW_KEYS)),
            ("AcceptRule", set(ACCEPT_KEYS)),
            ("Triggers", set(TRIGGERS_KEYS)),
            ("DeniedFlows", set(DENIED_FLOWS_KEYS)),
            ("Fanout", set(FANOUT_KEYS)),
        ]);
        assert_eq!(mappings, loader_mappings);
    }

    #[test]
    fn every_example_document_validates() {
        let validator = validator();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let mut checked = 0;
        for file in policy_files(&dir).unwrap() {
            let text = fs::read_to_string(&file).unwrap();
            for (i, doc) in documents(&text).iter().enumerate() {
                let errors: Vec<String> = validator
                    .iter_errors(doc)
                    .map(|e| format!("{}: {e}", e.instance_path))
                    .collect();
                assert!(
                    errors.is_empty(),
                    "{} document {}: {errors:#?}",
                    file.display(),
                    i + 1
                );
                checked += 1;
            }
        }
        assert!(checked >= 6, "only {checked} documents found");
    }

    /// The schema and the loader agree on documents that are right or wrong in shape.
    #[test]
    fn schema_and_loader_agree_on_shapes() {
        let validator = validator();
        let cases: &[(&str, bool)] = &[
            (
                "kind: Segment\nname: s\ndescription:\nmode: audit\ndevices:\n  - id: d\n    \
                 mac: \"02:00:00:00:00:01\"\n    addresses: [10.0.0.1, \"2001:db8::1\"]\n\
                 allow:\n  - to: gateway\n    ports: [\"1-65535/tcp\", sctp, icmpv6, any]\n\
                 accept:\n  - from: 192.0.2.0/24\n    ports: [\"22/tcp\"]\n",
                true,
            ),
            (
                "kind: Zone\nname: z\ncidrs: [\"2001:db8::/32\", 10.0.0.1]\n",
                true,
            ),
            (
                "kind: Quarantine\ntriggers:\n  denied_flows: {count: 1, window: 500ms}\n  \
                 fanout:\n",
                true,
            ),
            ("kind: Segment\nname: s\nowner: me\n", false),
            ("kind: Segmnt\nname: s\n", false),
            ("name: s\n", false),
            ("kind: Segment\nname: Sensors\n", false),
            ("kind: Segment\nname: s\nmode: strict\n", false),
            (
                "kind: Segment\nname: s\ndevices: [{id: d, mac: \"02:00:00:00:00\"}]\n",
                false,
            ),
            ("kind: Segment\nname: s\nallow: [{to: gateway}]\n", false),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: []}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: [80]}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: [\"80\"]}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: [\"0/tcp\"]}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: [\"65536/tcp\"]}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\nallow: [{to: gateway, ports: [\"8/icmp\"]}]\n",
                false,
            ),
            (
                "kind: Segment\nname: s\naccept: [{to: 10.0.0.0/8, ports: [tcp]}]\n",
                false,
            ),
            ("kind: Zone\nname: z\ncidrs: []\n", false),
            ("kind: Zone\nname: z\n", false),
            (
                "kind: Quarantine\ntriggers: {denied_flows: {count: 0, window: 1s}}\n",
                false,
            ),
            (
                "kind: Quarantine\ntriggers: {fanout: {destinations: 5, window: 10}}\n",
                false,
            ),
            ("kind: Quarantine\ntriggers: {scan: {}}\n", false),
        ];
        for (text, valid) in cases {
            let doc = &documents(text)[0];
            assert_eq!(validator.is_valid(doc), *valid, "schema on {text:?}");
            let loaded = load_str(Path::new("t.yaml"), text);
            assert_eq!(loaded.is_ok(), *valid, "loader on {text:?}: {loaded:?}");
        }
    }
}
