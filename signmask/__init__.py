"""signmask: signed-mask lottery tickets on top of ``torch.nn.utils.prune``.

Prune any model (a timm model included), extract its signed mask as a :class:`Ticket`, save it
as ``.safetensors`` and transfer it to a new random initialization::

    import signmask
    signmask.prune(model, 0.8)                 # global magnitude, in place
    ticket = signmask.extract(model)           # sign(theta * M) per pruned tensor
    signmask.save(ticket, "ticket.safetensors")
    signmask.transfer("ticket.safetensors", new_model)
    signmask.set_backend(model, "auto")        # fused Triton path on CUDA, torch on CPU

or let :func:`apply` run IMP, LRR, AWS or OMP around an existing training loop::

    search = signmask.apply(model, "aws", 0.8, optimizer=opt, scheduler=sched)
    for round in search:                       # round 0 dense, then prune + restart each round
        train(model, opt, sched)               # the user's own loop, unchanged
    search.save("ticket.safetensors")          # sign(theta_T * M_T), with the search's metadata

``import signmask`` imports neither timm nor torchvision and does not touch CUDA.
"""

from ._backends import set_backend
from ._io import load, save
from ._prune import prune, remove
from ._state_dict import load_state_dict
from ._apply import apply
from ._search import Search
from ._extract import extract
from ._ticket import Ticket
from ._transfer import transfer
from ._version import __version__

__all__ = [
    "Search",
    "Ticket",
    "__version__",
    "apply",
    "extract",
    "load",
    "load_state_dict",
    "prune",
    "remove",
    "save",
    "set_backend",
    "transfer",
]
