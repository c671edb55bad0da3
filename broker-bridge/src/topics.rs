//! Topic policy: which topics are protected Quva groups, and what a topic or filter names.
//!
//! Implements the default topic layout of PROTOCOL.md §8: data on `<group>`, queries on
//! `<group>/_q`, OTA under `<group>/_ota/`, key topics `quva/k/<group>/<pub|sub>`, individual
//! notices `quva/k/<group>/<pub|sub>/<device>`, member certificates `quva/c/<group>` and direct
//! messages `quva/d/<device>`. The bridge's configuration names the protected groups with MQTT
//! topic filters (MQTT 5 §4.7); every topic a protected filter matches is a group, everything else
//! is relayed unchanged.
//!
//! No topic has two meanings: a group ID with a level that starts with `_` is refused (those
//! levels are reserved for `_q` and `_ota`), and the device IDs `pub` and `sub` are refused (so
//! that `quva/k/<a>/sub/pub` can only be the key topic of the group `<a>/sub`, never device
//! `pub`'s individual topic in group `<a>`).
//!
//! # Usage
//! ```
//! use quva_bridge::topics::{TopicKind, TopicPolicy};
//! let policy = TopicPolicy::new(["plant/#"]).unwrap();
//! assert!(matches!(policy.classify("plant/line-3/temp"), TopicKind::Data(_)));
//! assert!(matches!(policy.classify("plant/line-3/temp/_q"), TopicKind::Query(_)));
//! assert!(matches!(policy.classify("weather/today"), TopicKind::Unprotected));
//! assert!(policy.filter_touches_protected("plant/+/temp"));
//! assert!(!policy.filter_touches_protected("weather/#"));
//! ```

use quva_client::ids::{DeviceId, GroupId, Role};

/// The query-topic suffix of PROTOCOL.md §8.
pub const QUERY_SUFFIX: &str = "/_q";
/// The level that starts a group's OTA topics (PROTOCOL.md §7.2, §8).
pub const OTA_LEVEL: &str = "/_ota/";
/// The prefix of every topic the bridge reserves for itself.
pub const RESERVED_PREFIX: &str = "quva/";

/// A topic filter in the configuration that is not a valid MQTT topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid protected topic filter")]
pub struct InvalidFilter;

/// What a topic name means to the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicKind {
    /// Not protected: relayed unchanged.
    Unprotected,
    /// The data topic of a protected group (forward messages, publisher → subscribers).
    Data(GroupId),
    /// The query topic `<group>/_q` of a protected group (subscriber → publishers).
    Query(GroupId),
    /// A key topic `quva/k/<group>/<pub|sub>`: group-key requests and broadcast notices.
    Key(GroupId, Role),
    /// An individual notice topic `quva/k/<group>/<pub|sub>/<device>`.
    Individual(GroupId, Role, DeviceId),
    /// The member certificate list `quva/c/<group>`.
    Certificates(GroupId),
    /// A group's OTA topic `<group>/_ota/…` (PROTOCOL.md §7.2).
    Ota(GroupId),
    /// The direct-message topic `quva/d/<device>` (PROTOCOL.md §7.1).
    Direct(DeviceId),
    /// Anything else under `quva/`, or a `$` topic: no device may use it.
    Reserved,
}

/// The protected-topic policy: topic filters whose matching topics are Quva groups.
#[derive(Clone, Debug, Default)]
pub struct TopicPolicy {
    protected: Vec<String>,
}

impl TopicPolicy {
    /// Builds the policy from topic filters (`+` and `#` allowed as in MQTT).
    ///
    /// # Errors
    /// [`InvalidFilter`] for an empty or malformed filter, or one that would cover `quva/` or `$`
    /// topics.
    pub fn new<I, S>(filters: I) -> Result<Self, InvalidFilter>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut protected = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if !valid_filter(f) || f.starts_with('$') || f.starts_with(RESERVED_PREFIX) {
                return Err(InvalidFilter);
            }
            protected.push(f.to_owned());
        }
        Ok(TopicPolicy { protected })
    }

    /// The configured filters.
    pub fn filters(&self) -> &[String] {
        &self.protected
    }

    /// Whether `topic` (a topic name) is the data topic of a protected group.
    fn is_protected_group(&self, topic: &str) -> bool {
        self.protected.iter().any(|f| filter_matches(f, topic))
    }

    /// Classifies a topic name.
    pub fn classify(&self, topic: &str) -> TopicKind {
        if topic.starts_with('$') {
            return TopicKind::Reserved;
        }
        if let Some(rest) = topic.strip_prefix(RESERVED_PREFIX) {
            return classify_reserved(rest);
        }
        if let Some(group) = topic.strip_suffix(QUERY_SUFFIX)
            && self.is_protected_group(group)
        {
            return group_id(group).map_or(TopicKind::Reserved, TopicKind::Query);
        }
        if let Some((group, _)) = topic.split_once(OTA_LEVEL)
            && self.is_protected_group(group)
        {
            return group_id(group).map_or(TopicKind::Reserved, TopicKind::Ota);
        }
        if self.is_protected_group(topic) {
            return group_id(topic).map_or(TopicKind::Reserved, TopicKind::Data);
        }
        TopicKind::Unprotected
    }

    /// Whether a Will Message may name `topic` (PROTOCOL.md §8): only unprotected topics. A Will
    /// is published by the broker under the bridge's credentials after the client is gone, so
    /// nothing could check it then.
    pub fn will_allowed(&self, topic: &str) -> bool {
        self.classify(topic) == TopicKind::Unprotected
    }

    /// The group whose OTA topics a wildcard filter stays within (PROTOCOL.md §7.2), if any:
    /// `<group>/_ota/<rest>` with the group spelt out (no wildcard) and protected, and wildcards
    /// only in `<rest>` (`plant/a/_ota/#`, `plant/a/_ota/rel-1/#`, `plant/a/_ota/+/7/m`). Every
    /// topic such a filter matches is one of that group's OTA topics or a reserved one that no
    /// device may publish on, so it is granted as the group's OTA topics are.
    pub fn ota_filter_group(&self, filter: &str) -> Option<GroupId> {
        let (group, rest) = filter.split_once(OTA_LEVEL)?;
        if group.contains(['+', '#']) || rest.is_empty() || !self.is_protected_group(group) {
            return None;
        }
        group_id(group)
    }

    /// Whether a subscription filter with wildcards could match any protected or reserved topic.
    /// Such filters are refused: a device subscribes to a group's traffic by its exact topic.
    pub fn filter_touches_protected(&self, filter: &str) -> bool {
        if filters_intersect(filter, "quva/#") || filter.starts_with('$') {
            return true;
        }
        self.protected.iter().any(|p| {
            filters_intersect(filter, p)
                || filters_intersect(filter, &format!("{p}{QUERY_SUFFIX}"))
                || filters_intersect(filter, &format!("{p}{OTA_LEVEL}#"))
        })
    }
}

/// A group ID as the bridge accepts it: a valid [`GroupId`] with no topic level that starts
/// with `_` (PROTOCOL.md §8).
fn group_id(s: &str) -> Option<GroupId> {
    if s.split('/').any(|level| level.starts_with('_')) {
        return None;
    }
    GroupId::new(s).ok()
}

/// A device ID as topics may name it: valid, and neither `pub` nor `sub`.
pub fn topic_device_id(s: &str) -> Option<DeviceId> {
    if role_of(s).is_some() {
        return None;
    }
    DeviceId::new(s).ok()
}

fn role_of(s: &str) -> Option<Role> {
    match s {
        "pub" => Some(Role::Publisher),
        "sub" => Some(Role::Subscriber),
        _ => None,
    }
}

fn classify_reserved(rest: &str) -> TopicKind {
    if let Some(g) = rest.strip_prefix("c/") {
        return group_id(g).map_or(TopicKind::Reserved, TopicKind::Certificates);
    }
    if let Some(d) = rest.strip_prefix("d/") {
        return topic_device_id(d).map_or(TopicKind::Reserved, TopicKind::Direct);
    }
    let Some(rest) = rest.strip_prefix("k/") else {
        return TopicKind::Reserved;
    };
    // quva/k/<group>/<pub|sub>[/<device>]; the group may contain '/', the device may not.
    if let Some((group, last)) = rest.rsplit_once('/') {
        if let (Some(role), Some(g)) = (role_of(last), group_id(group)) {
            return TopicKind::Key(g, role);
        }
        // `quva/k/sub/<device>` has no group: `rsplit_once` finds none before the role.
        if let Some((group, prev)) = group.rsplit_once('/')
            && let (Some(role), Some(device)) = (role_of(prev), topic_device_id(last))
            && let Some(g) = group_id(group)
        {
            return TopicKind::Individual(g, role, device);
        }
    }
    TopicKind::Reserved
}

/// Whether `f` is a syntactically valid MQTT topic filter (MQTT 5 §4.7.1).
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    let n = levels.len();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == n - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether the topic filter `filter` matches the topic name `topic` (MQTT 5 §4.7).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic name is matched by both filters.
pub fn filters_intersect(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Strips a shared-subscription prefix `$share/<name>/` and returns the inner filter.
pub fn unshare(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, inner)| inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TopicPolicy {
        TopicPolicy::new(["plant/#", "hall/+/temp"]).unwrap()
    }

    #[test]
    fn classifies_the_default_layout() {
        let p = policy();
        let g = |s: &str| GroupId::new(s).unwrap();
        assert_eq!(p.classify("plant/a/b"), TopicKind::Data(g("plant/a/b")));
        assert_eq!(p.classify("plant/a/_q"), TopicKind::Query(g("plant/a")));
        assert_eq!(p.classify("hall/1/temp"), TopicKind::Data(g("hall/1/temp")));
        assert_eq!(
            p.classify("hall/1/temp/_q"),
            TopicKind::Query(g("hall/1/temp"))
        );
        assert_eq!(p.classify("hall/1/hum"), TopicKind::Unprotected);
        assert_eq!(
            p.classify("quva/k/plant/a/sub"),
            TopicKind::Key(g("plant/a"), Role::Subscriber)
        );
        assert_eq!(
            p.classify("quva/k/plant/a/pub/dev-1"),
            TopicKind::Individual(
                g("plant/a"),
                Role::Publisher,
                DeviceId::new("dev-1").unwrap()
            )
        );
        assert_eq!(
            p.classify("quva/c/plant/a"),
            TopicKind::Certificates(g("plant/a"))
        );
        assert_eq!(p.classify("quva/x"), TopicKind::Reserved);
        assert_eq!(p.classify("quva/k/sub"), TopicKind::Reserved);
        assert_eq!(p.classify("$SYS/broker"), TopicKind::Reserved);
    }

    #[test]
    fn no_topic_has_two_meanings() {
        let p = policy();
        let g = |s: &str| GroupId::new(s).unwrap();
        // Group IDs with a level starting with `_` are reserved, wherever the level is.
        for t in [
            "plant/_x",
            "plant/_q/b",
            "plant/a/_ota",
            "quva/c/plant/_q",
            "quva/k/plant/_a/sub",
        ] {
            assert_eq!(p.classify(t), TopicKind::Reserved, "{t}");
        }
        assert_eq!(
            p.classify("plant/a/_ota/s1/3/m"),
            TopicKind::Ota(g("plant/a"))
        );
        assert_eq!(p.classify("plant/a/_q"), TopicKind::Query(g("plant/a")));
        // quva/k/<a>/sub/pub is the key topic of group <a>/sub, never device `pub`'s notices.
        assert_eq!(
            p.classify("quva/k/plant/a/sub/pub"),
            TopicKind::Key(g("plant/a/sub"), Role::Publisher)
        );
        assert!(topic_device_id("pub").is_none() && topic_device_id("sub").is_none());
        assert_eq!(
            p.classify("quva/d/dev-1"),
            TopicKind::Direct(DeviceId::new("dev-1").unwrap())
        );
        assert_eq!(p.classify("quva/d/a/b"), TopicKind::Reserved);
        // A role and a device with no group before them (found by the bridge_session fuzz
        // target: the group length once went below zero).
        for t in [
            "quva/k/sub/dev-1",
            "quva/k/pub",
            "quva/k//sub",
            "quva/k/sub/",
        ] {
            assert_eq!(p.classify(t), TopicKind::Reserved, "{t}");
        }
        // Wills only on unprotected topics.
        assert!(p.will_allowed("status/dev-1"));
        for t in [
            "plant/a",
            "plant/a/_q",
            "quva/k/plant/a/sub",
            "quva/c/plant/a",
            "plant/a/_ota/s/1/m",
            "$SYS/x",
        ] {
            assert!(!p.will_allowed(t), "{t}");
        }
    }

    #[test]
    fn rejects_bad_policy_filters() {
        for bad in ["", "a/#/b", "a+/b", "quva/#", "$SYS/#"] {
            assert!(TopicPolicy::new([bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_and_intersection() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(filters_intersect("+/b", "a/+"));
        assert!(filters_intersect("#", "x/y"));
        assert!(!filters_intersect("a/+", "b/#"));
        assert!(!filters_intersect("a/+/c", "a/b"));
    }

    #[test]
    fn wildcard_filters_touching_groups_are_detected() {
        let p = policy();
        assert!(p.filter_touches_protected("#"));
        assert!(p.filter_touches_protected("+/+/temp"));
        assert!(p.filter_touches_protected("quva/k/#"));
        assert!(p.filter_touches_protected("hall/+/temp/_q"));
        assert!(!p.filter_touches_protected("weather/+"));
        assert!(!p.filter_touches_protected("hall/+/hum"));
        assert_eq!(unshare("$share/g1/plant/#"), "plant/#");
        // OTA filters of one spelt-out group are told apart (and still touch protected topics).
        let g = GroupId::new("plant/a").unwrap();
        for f in [
            "plant/a/_ota/#",
            "plant/a/_ota/rel-1/#",
            "plant/a/_ota/+/7/m",
        ] {
            assert!(p.filter_touches_protected(f), "{f}");
            assert_eq!(p.ota_filter_group(f), Some(g.clone()), "{f}");
        }
        for f in [
            "plant/+/_ota/#",
            "+/a/_ota/#",
            "plant/#",
            "plant/_x/_ota/#",
            "weather/_ota/#",
            "plant/a/_ota/",
            "#",
        ] {
            assert_eq!(p.ota_filter_group(f), None, "{f}");
        }
        assert_eq!(unshare("plant/#"), "plant/#");
    }
}
