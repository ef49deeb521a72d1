//! The gRPC codec of `tessera.v1`: prost's, except that
//! - a request the broker cannot parse is the caller's mistake
//!   (`INVALID_ARGUMENT`, as the broker documents), not the server's
//!   (`INTERNAL`, tonic's default); a response a client cannot parse stays
//!   `INTERNAL`;
//! - each stream's encode buffer starts at 256 bytes instead of 8 KiB: a
//!   `Watch` stream is open for a pod's whole life and its messages are
//!   small, so 10,000 streams no longer hold 80 MiB of empty buffers.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::{peer, v1};

/// What a message that does not parse becomes.
pub trait ParseFailure {
    /// `INVALID_ARGUMENT` for requests, `INTERNAL` for responses.
    const CODE: Code;
}

macro_rules! parse_failure {
    ($code:expr => $($message:ty),+) => {
        $(impl ParseFailure for $message { const CODE: Code = $code; })+
    };
}

parse_failure!(Code::InvalidArgument => v1::WhoAmIRequest, v1::FetchRequest, v1::WatchRequest, v1::RevokeRequest);
parse_failure!(Code::Internal => v1::WhoAmIResponse, v1::FetchResponse, v1::WatchResponse, v1::RevokeResponse);
parse_failure!(Code::InvalidArgument => peer::v1::FollowRequest);
parse_failure!(Code::Internal => peer::v1::KvCopy);

/// prost's codec with [`ParseFailure`] codes.
#[derive(Debug, Clone, Default)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + ParseFailure + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(encode_buffer())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// The encode buffer: small to start with (it grows as a message needs),
/// tonic's default yield threshold.
fn encode_buffer() -> BufferSettings {
    BufferSettings::new(256, 32 * 1024)
}

/// prost's decoder, with the status code of [`ParseFailure`].
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + ParseFailure> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::new(
                U::CODE,
                format!("malformed protobuf message: {}", status.message()),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
