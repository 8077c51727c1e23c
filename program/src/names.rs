//! How both programs show text a peer sent them (names, hostnames, filters, close reasons):
//! as data, without the control characters that could forge log lines or move a terminal's
//! cursor, and how a sensor is named in the receiver's logs, output and exit summary.

use std::net::SocketAddr;

use protocol::Hello;

/// `s` without its control characters: peer-supplied text never reaches an output or a log
/// with them.
pub fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// How the output and the logs name a sensor: by the name in its verified client
/// certificate, else by the id it gives itself.
pub fn sensor_name(hello: &Hello, identity: Option<&str>) -> String {
    clean(identity.unwrap_or(&hello.sensor_id))
}

/// `sensor NAME (HOST, PEER)`, a sensor in the logs and the exit summary.
pub fn sensor_label(hello: &Hello, identity: Option<&str>, peer: SocketAddr) -> String {
    format!(
        "sensor {} ({}, {peer})",
        sensor_name(hello, identity),
        clean(&hello.hostname)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_loses_its_control_characters() {
        assert_eq!(clean("tap\u{1b}[31m-1\n\u{7f}ü"), "tap[31m-1ü");
        let hello = Hello {
            version: protocol::PROTOCOL_VERSION,
            session_id: 1,
            session_secret: [0; protocol::SESSION_SECRET_LEN],
            sensor_id: "id\r\nforged".into(),
            hostname: "host\u{0}".into(),
            os: String::new(),
            interfaces: Vec::new(),
            token: None,
            available: Vec::new(),
            on_demand: false,
            tls_key_log: false,
        };
        assert_eq!(sensor_name(&hello, None), "idforged");
        assert_eq!(sensor_name(&hello, Some("cert\u{9}name")), "certname");
        let peer: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        assert_eq!(
            sensor_label(&hello, None, peer),
            "sensor idforged (host, 192.0.2.1:4433)"
        );
    }
}
