//! Boot blocks: resolved against the ACL, one grant per card.

use super::*;

const MAC: &str = "52:54:00:AB:00:01";

fn boot_grant(name: &str, initiator: &str, boot: Value) -> InitiatorAccess {
    object(
        "InitiatorAccess",
        name,
        json!({"targetRef": {"name": "boot"}, "initiatorIqn": initiator,
               "chap": {"secretRef": {"name": "c"}}, "boot": boot}),
    )
}

fn world() -> World {
    World::new()
        .ready_image("debian", DIGEST_A)
        .target(
            "boot",
            json!({"luns": [{"lun": 2, "image": "debian"}, {"lun": 5, "image": "debian"}]}),
        )
        .secret("c", &[("username", "u"), ("password", "s3cret-s3cret")])
}

#[test]
fn a_boot_block_boots_the_grants_lowest_lun_unless_it_names_one() {
    let state = world()
        .grant_object(boot_grant("a", INITIATOR, json!({"macAddresses": [MAC]})))
        .grant_object(boot_grant(
            "b",
            "iqn.2010-04.org.ipxe:b",
            json!({"macAddresses": ["52:54:00:ab:00:02"], "lun": 5,
                   "sourceCidrs": ["10.0.0.0/24"]}),
        ))
        .compute();
    assert_eq!(reasons(&state), []);
    let a = &state.boots[&key("a")];
    assert_eq!(a.lun, 2);
    assert_eq!(a.macs[0].to_string(), "52:54:00:ab:00:01");
    let b = &state.boots[&key("b")];
    assert_eq!((b.lun, b.sources[0].to_string()), (5, "10.0.0.0/24".into()));
}

#[test]
fn a_card_two_grants_name_boots_through_neither_and_both_keep_their_access() {
    let state = world()
        .grant_object(created(
            boot_grant(
                "newer",
                "iqn.2010-04.org.ipxe:b",
                json!({"macAddresses": [MAC.to_lowercase(), "52:54:00:ab:00:09"]}),
            ),
            "2026-11-20T00:00:00Z",
        ))
        .grant_object(created(
            boot_grant("older", INITIATOR, json!({"macAddresses": [MAC]})),
            "2026-11-19T00:00:00Z",
        ))
        .compute();
    let mut told = reasons(&state);
    told.sort();
    assert_eq!(
        told,
        [
            (
                Kind::InitiatorAccess,
                "newer".into(),
                Reason::DuplicateBootMac
            ),
            (
                Kind::InitiatorAccess,
                "older".into(),
                Reason::DuplicateBootMac
            ),
        ]
    );
    assert!(
        state
            .problems
            .iter()
            .all(|p| p.message.contains("52:54:00:ab:00:01"))
    );
    // The shared card boots through nobody; the other card of the newer grant still boots.
    assert_eq!(state.boots.keys().collect::<Vec<_>>(), [&key("newer")]);
    assert_eq!(state.boots[&key("newer")].macs.len(), 1);
    assert_eq!(state.targets[0].acls.len(), 2);
}

#[test]
fn a_boot_lun_the_target_lacks_withholds_the_script_not_the_access() {
    let state = world()
        .grant_object(boot_grant(
            "a",
            INITIATOR,
            json!({"macAddresses": [MAC], "lun": 3}),
        ))
        .compute();
    assert_eq!(
        reasons(&state),
        [(Kind::InitiatorAccess, "a".into(), Reason::BootLunNotFound)]
    );
    assert!(state.problems[0].message.starts_with("spec.boot.lun"));
    assert!(state.boots.is_empty());
    assert_eq!(state.targets[0].acls.len(), 1);
}

#[test]
fn an_expired_boot_grant_boots_nothing() {
    let mut world =
        world().grant_object(boot_grant("a", INITIATOR, json!({"macAddresses": [MAC]})));
    world.grants[0].spec.expires_at = Some("2026-11-21T11:00:00Z".into());
    let state = world.compute();
    assert!(state.boots.is_empty());
    assert_eq!(state.expired, [key("a")]);
}
