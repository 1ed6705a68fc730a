"""memryx: an asyncio-native runtime for the MemryX MX3 AI accelerator.

Compile ONNX models with :class:`NeuralCompiler`, then run the DFP with
:class:`AsyncAccl`, :class:`SyncAccl` or :class:`MultiStreamAsyncAccl`, on the
simulated MX3 (the default) or a device server.
"""

import logging as _logging

from ._exceptions import CallbackSignatureError as CallbackSignatureError
from ._exceptions import ClosedError as ClosedError
from ._exceptions import CompilerError as CompilerError
from ._exceptions import DeviceError as DeviceError
from ._exceptions import DfpError as DfpError
from ._exceptions import DtypeError as DtypeError
from ._exceptions import InputCountError as InputCountError
from ._exceptions import LoopBlockingError as LoopBlockingError
from ._exceptions import MemryxError as MemryxError
from ._exceptions import ModelIndexError as ModelIndexError
from ._exceptions import NotConnectedError as NotConnectedError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import ShapeError as ShapeError
from ._exceptions import StreamCountError as StreamCountError
from ._exceptions import UsageError as UsageError
from ._options import ClientOptions as ClientOptions
from ._options import SchedulerOptions as SchedulerOptions
from ._version import __version__ as __version__
from .accl import AsyncAccl as AsyncAccl
from .accl import MultiStreamAsyncAccl as MultiStreamAsyncAccl
from .accl import SyncAccl as SyncAccl
from .benchmark import Benchmark as Benchmark
from .compiler import NeuralCompiler as NeuralCompiler
from .dfp import Dfp as Dfp
from .dfp import ModelInfo as ModelInfo
from .dfp import PortInfo as PortInfo

# silent unless the application configures logging (no last-resort handler output)
_logging.getLogger("memryx").addHandler(_logging.NullHandler())

__all__ = [
    "AsyncAccl",
    "Benchmark",
    "CallbackSignatureError",
    "ClientOptions",
    "ClosedError",
    "CompilerError",
    "DeviceError",
    "Dfp",
    "DfpError",
    "DtypeError",
    "InputCountError",
    "LoopBlockingError",
    "MemryxError",
    "ModelIndexError",
    "ModelInfo",
    "MultiStreamAsyncAccl",
    "NeuralCompiler",
    "NotConnectedError",
    "PortInfo",
    "ProtocolError",
    "SchedulerOptions",
    "ShapeError",
    "StreamCountError",
    "SyncAccl",
    "UsageError",
    "__version__",
]
