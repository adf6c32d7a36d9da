"""Who may call, and what a call may spend: the admission interface (`base`) with the open and
the keyed (`quota`) implementations."""

from gateway.admission.base import (
    ANONYMOUS,
    OPEN_TICKET,
    Admission,
    ImageRequest,
    Outcome,
    Principal,
    Ticket,
)
from gateway.admission.quota import QuotaAdmission, QuotaTicket

__all__ = ["ANONYMOUS", "OPEN_TICKET", "Admission", "ImageRequest", "Outcome", "Principal",
           "QuotaAdmission", "QuotaTicket", "Ticket"]
