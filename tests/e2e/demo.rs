//! `cargo xtask demo` checked: the same story (tests/demo/) on the example policy
//! (`segments/`), and what it must show.

use std::time::Duration;

#[path = "../demo/mod.rs"]
mod story;

#[test]
fn the_demo_story_goes_as_told() {
    let s = story::run(&story::Options {
        color: false,
        pace: Duration::ZERO,
    })
    .expect("nothing interrupts a test");
    let flows = || format!("{:#?}", s.flows);

    assert!(s.surprises.is_empty(), "surprises: {:#?}", s.surprises);
    assert!(s.cleaned_up, "the lab left something behind");

    // Normal operations pass.
    for id in [
        "sensor-mqtt",
        "vibration-mqtt",
        "broker-cloud",
        "plc-modbus",
        "sensor-ntp",
        "ops-ssh",
        "camera-mqtt-open",
    ] {
        assert!(s.flow(id).passed, "{id} should pass: {}", flows());
    }
    // Zero trust: what no rule allows is dropped, and the deny event says why.
    for id in ["sensor-to-camera", "sensor-to-cloud", "camera-to-plc"] {
        let f = s.flow(id);
        assert!(!f.passed && f.outcome == "timed out", "{id}: {f:?}");
        assert_eq!(f.reason.as_deref(), Some("default_deny"), "{id}: {f:?}");
    }

    // The scanning camera is quarantined automatically and at once.
    let q = s.quarantine.as_ref().expect("the camera was quarantined");
    assert_eq!(q.device, "cam-01");
    assert_eq!(q.by, "trigger:denied_flows");
    assert!(q.detail.contains("denied flows"), "{q:?}");
    assert_eq!(
        (q.state.as_str(), q.state_by.as_str()),
        ("quarantined", "trigger:denied_flows")
    );
    assert!(
        q.after < Duration::from_secs(5),
        "quarantined {:?} into the scan",
        q.after
    );
    assert!(s.scan.logged_default_deny > 0, "{:?}", s.scan);
    assert_eq!(s.scan.reached_target, 0, "the scan reached plc-7");
    assert!(s.connection_cut, "the camera's open connection was cut");
    // Quarantined: only the Quarantine document's rules.
    let f = s.flow("quarantined-mqtt");
    assert!(!f.passed, "{f:?}");
    assert_eq!(f.reason.as_deref(), Some("quarantined"), "{f:?}");
    assert!(s.flow("quarantined-remediation").passed, "{}", flows());

    // Released: its own policy again.
    assert!(s.released && s.release_event);
    assert!(s.flow("released-mqtt").passed, "{}", flows());
    let f = s.flow("released-remediation");
    assert_eq!(f.reason.as_deref(), Some("default_deny"), "{f:?}");

    // The counters agree with the story.
    for (verdict, reason) in [
        ("pass", "allowed"),
        ("pass", "reply"),
        ("drop", "default_deny"),
        ("drop", "quarantined"),
    ] {
        assert!(
            s.packets(verdict, reason) > 0,
            "no {verdict}/{reason} packets counted: {:?}",
            s.packets
        );
    }
    assert!(
        s.daemon_exit.contains("exit status: 0"),
        "{}",
        s.daemon_exit
    );
}
