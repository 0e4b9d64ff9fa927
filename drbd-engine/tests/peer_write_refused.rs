//! A peer's write that the receiver refuses (outside its device) ends the connection with a
//! protocol error, and nothing more is sent on it: under protocol B the receiver
//! acknowledged the write's receipt on the closed connection and its engine asserted
//! (mesh seed 3554: a node grown by a third node's Hello, while Established with a peer that
//! had not grown yet, became primary and wrote beyond that peer's device).

mod common;

use common::Pair;
use drbd_engine::protocol::frame::{self, Envelope, Frame};
use drbd_engine::protocol::node::{AppRequest, Event, OnIoError, RequestId};
use drbd_engine::protocol::{ConnectionState, ReplicationProtocol};

const SIZE_BLOCKS: u64 = 64;

#[test]
fn a_write_outside_the_device_drops_the_connection_without_a_receipt() {
    for protocol in [ReplicationProtocol::B, ReplicationProtocol::C] {
        let mut pair = Pair::new(SIZE_BLOCKS, protocol, OnIoError::Detach, false);
        pair.nodes[0].handle_promote(pair.now_ms + 1, false).unwrap();
        pair.run();
        // The primary's write stays on the wire; it is changed there to end beyond the
        // secondary's device, as a primary that grew alone would send it.
        pair.held[0] = true;
        let now = pair.tick();
        let data = common::block_data(SIZE_BLOCKS - 1, 1).into();
        let write = AppRequest::Write { offset_blocks: SIZE_BLOCKS - 1, data, fua: false };
        pair.nodes[0].handle_request(now, RequestId(1), write);
        pair.run();
        let frames: Vec<Vec<u8>> = pair.wire[0].drain(..).collect();
        let mut changed = 0;
        for bytes in frames {
            let envelope = frame::decode(&bytes).expect("a frame of the engine");
            let bytes = match envelope.frame {
                Frame::Data { id, fua, data, .. } => {
                    changed += 1;
                    let frame = Frame::Data { id, offset_blocks: SIZE_BLOCKS, fua, data };
                    frame::encode(&Envelope { frame, ..envelope })
                }
                _ => bytes,
            };
            let now = pair.tick();
            pair.nodes[1].handle_receive(now, common::other(1), &bytes);
        }
        assert_eq!(changed, 1, "{protocol:?}: one Data frame");
        pair.held[0] = false;
        pair.run();
        let refused = pair.events.iter().any(|(n, e)| {
            *n == 1
                && matches!(e, Event::ProtocolError { reason, .. } if reason == "write outside the device")
        });
        assert!(refused, "{protocol:?}: the secondary refused the write");
        assert_ne!(
            pair.nodes[1].connection_state(common::other(1)),
            Some(ConnectionState::Connected),
            "{protocol:?}: the connection ended"
        );
    }
}
