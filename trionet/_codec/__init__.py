"""Sans-IO codecs: bytes in, messages out.  Nothing in this package does I/O
or imports trio."""

from ._buffer import ReceiveBuffer as ReceiveBuffer
from ._decoder import Decoder as Decoder
from ._framing import Frames as Frames
from ._framing import Framing as Framing
from ._framing import Lines as Lines
from ._framing import as_bytes as as_bytes
