//! The default topic layout of PROTOCOL.md §8, in one place: builders for every topic a device,
//! the bridge or a release signer names, and a parser for the OTA topics of §7.2.
//!
//! | Topic | Builder |
//! |---|---|
//! | `<group>` | [`data`] |
//! | `<group>/_q` | [`query`] |
//! | `<group>` or `<group>/_q`, by role | [`receive`] |
//! | `quva/k/<group>/<pub\|sub>` | [`key`] |
//! | `quva/k/<group>/<pub\|sub>/<device>` | [`individual`] |
//! | `quva/c/<group>` | [`certificates`] |
//! | `quva/d/<device>` | [`direct`] |
//! | `<group>/_ota/<signer>/<v>/m`, `…/k`, `…/c/<j>` | [`OtaTopic`] |
//!
//! Versions and chunk indices are written in decimal without leading zeros, so every OTA item has
//! exactly one topic; [`OtaTopic::parse`] refuses any other spelling.
//!
//! # Usage
//! ```
//! use quva_client::ids::{DeviceId, GroupId};
//! use quva_client::topics::{self, OtaItem, OtaTopic};
//! let group = GroupId::new("fw/sensor-v2").unwrap();
//! let signer = DeviceId::new("release-1").unwrap();
//! let t = OtaTopic { group: group.clone(), signer, version: 7, item: OtaItem::Chunk(3) };
//! assert_eq!(t.to_string(), "fw/sensor-v2/_ota/release-1/7/c/3");
//! assert_eq!(OtaTopic::parse("fw/sensor-v2/_ota/release-1/7/c/3"), Some(t));
//! assert_eq!(topics::direct(&DeviceId::new("dev-1").unwrap()), "quva/d/dev-1");
//! ```

use core::fmt;

use crate::ids::{DeviceId, GroupId, Role};

/// The level of a group's query topic.
pub const QUERY_LEVEL: &str = "_q";
/// The level under which a group's OTA releases live.
pub const OTA_LEVEL: &str = "_ota";
/// The prefix of the topics the bridge reserves (key, certificate and direct topics).
pub const RESERVED_PREFIX: &str = "quva/";
/// The prefix of direct-message topics: `quva/d/<device>`.
pub const DIRECT_PREFIX: &str = "quva/d/";

/// The data topic of a group: the group ID itself.
pub fn data(group: &GroupId) -> String {
    group.as_str().to_owned()
}

/// The query topic `<group>/_q`.
pub fn query(group: &GroupId) -> String {
    format!("{}/{QUERY_LEVEL}", group.as_str())
}

/// The topic `role` receives on in `group`: the data topic for a subscriber, the query topic for
/// a publisher.
pub fn receive(group: &GroupId, role: Role) -> String {
    match role {
        Role::Subscriber => data(group),
        Role::Publisher => query(group),
    }
}

/// The key topic of `role` in `group`: `quva/k/<group>/<pub|sub>` (key requests, notices).
pub fn key(group: &GroupId, role: Role) -> String {
    format!("quva/k/{}/{}", group.as_str(), role.topic_segment())
}

/// The individual notice topic `quva/k/<group>/<pub|sub>/<device>` (v1 only).
pub fn individual(group: &GroupId, role: Role, device: &DeviceId) -> String {
    format!("{}/{}", key(group, role), device.as_str())
}

/// The member certificate topic of a group: `quva/c/<group>`.
pub fn certificates(group: &GroupId) -> String {
    format!("quva/c/{}", group.as_str())
}

/// The direct-message topic of a device: `quva/d/<device>` (PROTOCOL.md §7.1).
pub fn direct(device: &DeviceId) -> String {
    format!("{DIRECT_PREFIX}{}", device.as_str())
}

/// The device a direct-message topic belongs to, if `topic` is `quva/d/<valid device ID>`.
pub fn parse_direct(topic: &str) -> Option<DeviceId> {
    DeviceId::new(topic.strip_prefix(DIRECT_PREFIX)?).ok()
}

/// The filter that covers every item of one release: `<group>/_ota/<signer>/<v>/#`.
pub fn ota_release_filter(group: &GroupId, signer: &DeviceId, version: u64) -> String {
    format!(
        "{}/{OTA_LEVEL}/{}/{version}/#",
        group.as_str(),
        signer.as_str()
    )
}

/// The filter that covers every release of one signer: `<group>/_ota/<signer>/#`.
pub fn ota_signer_filter(group: &GroupId, signer: &DeviceId) -> String {
    format!("{}/{OTA_LEVEL}/{}/#", group.as_str(), signer.as_str())
}

/// What one OTA topic carries (PROTOCOL.md §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OtaItem {
    /// `m`: the signed manifest.
    Manifest,
    /// `k`: the key message (option 2 of the group).
    Key,
    /// `c/<j>`: encrypted chunk j.
    Chunk(u32),
}

/// An OTA topic `<group>/_ota/<signer>/<v>/m|k|c/<j>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OtaTopic {
    /// The OTA group.
    pub group: GroupId,
    /// The release signer.
    pub signer: DeviceId,
    /// The release version v.
    pub version: u64,
    /// Manifest, key message or chunk.
    pub item: OtaItem,
}

impl OtaTopic {
    /// Parses an OTA topic. `None` unless the group is a valid group ID with no level starting
    /// with `_` (PROTOCOL.md §8), the signer a valid device ID, and v and j canonical decimals.
    pub fn parse(topic: &str) -> Option<Self> {
        let marker = format!("/{OTA_LEVEL}/");
        let (group, rest) = topic.split_once(&marker)?;
        if group.split('/').any(|level| level.starts_with('_')) {
            return None;
        }
        let group = GroupId::new(group).ok()?;
        let mut levels = rest.split('/');
        let signer = DeviceId::new(levels.next()?).ok()?;
        let version = canonical_decimal(levels.next()?)?;
        let item = match (levels.next()?, levels.next()) {
            ("m", None) => OtaItem::Manifest,
            ("k", None) => OtaItem::Key,
            ("c", Some(j)) => OtaItem::Chunk(u32::try_from(canonical_decimal(j)?).ok()?),
            _ => return None,
        };
        if levels.next().is_some() {
            return None;
        }
        Some(OtaTopic {
            group,
            signer,
            version,
            item,
        })
    }
}

impl fmt::Display for OtaTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{OTA_LEVEL}/{}/{}/",
            self.group.as_str(),
            self.signer.as_str(),
            self.version
        )?;
        match self.item {
            OtaItem::Manifest => f.write_str("m"),
            OtaItem::Key => f.write_str("k"),
            OtaItem::Chunk(j) => write!(f, "c/{j}"),
        }
    }
}

/// A decimal with no sign and no leading zero (except `0` itself).
fn canonical_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }

    fn d(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn builders_follow_the_layout() {
        let group = g("a/b");
        let dev = d("dev-1");
        assert_eq!(data(&group), "a/b");
        assert_eq!(query(&group), "a/b/_q");
        assert_eq!(receive(&group, Role::Subscriber), "a/b");
        assert_eq!(receive(&group, Role::Publisher), "a/b/_q");
        assert_eq!(key(&group, Role::Publisher), "quva/k/a/b/pub");
        assert_eq!(key(&group, Role::Subscriber), "quva/k/a/b/sub");
        assert_eq!(
            individual(&group, Role::Subscriber, &dev),
            "quva/k/a/b/sub/dev-1"
        );
        assert_eq!(certificates(&group), "quva/c/a/b");
        assert_eq!(direct(&dev), "quva/d/dev-1");
        assert_eq!(parse_direct("quva/d/dev-1"), Some(dev.clone()));
        assert_eq!(parse_direct("quva/d/a/b"), None);
        assert_eq!(parse_direct("quva/c/dev-1"), None);
        assert_eq!(ota_release_filter(&group, &dev, 3), "a/b/_ota/dev-1/3/#");
        assert_eq!(ota_signer_filter(&group, &dev), "a/b/_ota/dev-1/#");
    }

    #[test]
    fn ota_topics_round_trip() {
        for item in [
            OtaItem::Manifest,
            OtaItem::Key,
            OtaItem::Chunk(0),
            OtaItem::Chunk(u32::MAX),
        ] {
            let t = OtaTopic {
                group: g("fleet/eu/site-7"),
                signer: d("rel"),
                version: u64::MAX,
                item,
            };
            assert_eq!(OtaTopic::parse(&t.to_string()), Some(t));
        }
        assert_eq!(OtaTopic::parse("x/_ota/s/0/m").map(|t| t.version), Some(0));
    }

    #[test]
    fn ota_topics_have_one_spelling() {
        for bad in [
            "x/_ota/s/01/m",
            "x/_ota/s/+1/m",
            "x/_ota/s//m",
            "x/_ota/s/1/c/01",
            "x/_ota/s/1/c/4294967296",
            "x/_ota/s/18446744073709551616/m",
            "x/_ota/s/1/c",
            "x/_ota/s/1/m/extra",
            "x/_ota/s/1/k/0",
            "x/_ota/s/1/q",
            "x/_ota/bad id/1/m",
            "x/_ota/s",
            "_x/_ota/s/1/m",
            "a/_q/_ota/s/1/m",
            "quva/d/_ota/s/1/m",
            "x/_ota/s/1/",
            "_ota/s/1/m",
        ] {
            assert_eq!(OtaTopic::parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "[a-z0-9/_.+#-]{0,40}") {
            if let Some(t) = OtaTopic::parse(&s) {
                prop_assert_eq!(t.to_string(), s.clone());
            }
            let _ = parse_direct(&s);
        }
    }
}
