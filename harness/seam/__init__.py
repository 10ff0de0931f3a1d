"""The software TDX module (see docs and design: harness/seam is pure Python, no VM needed)."""

from harness.seam.call import SeamcallRequest, SeamcallResult, Variant
from harness.seam.faults import FaultPlan, FaultRule
from harness.seam.module import HelloAck, TdxModule
from harness.seam.platform import PlatformConfig
from harness.seam.trace import Trace, TraceRecord

__all__ = ["FaultPlan", "FaultRule", "HelloAck", "PlatformConfig", "SeamcallRequest", "SeamcallResult",
           "TdxModule", "Trace", "TraceRecord", "Variant"]
