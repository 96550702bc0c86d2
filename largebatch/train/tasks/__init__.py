"""The built-in tasks, by name.

=================  =========================================================  ==================
name               what                                                       module
=================  =========================================================  ==================
``mnist-lenet``    LeNet-5 on MNIST (bundled)                                 ``tasks/mnist.py``
``cifar10-resnet`` DavidNet ResNet-9 on CIFAR-10 (user-supplied data)         ``tasks/cifar.py``
``bert-mlm``       small BERT, masked LM on Shakespeare (bundled)             ``tasks/bert.py``
=================  =========================================================  ==================

Each module is imported only when its task is built, so ``bert-mlm``'s optional dependencies
(``transformers``, ``tokenizers``) are not needed for the others. ``get_task`` checks option
names against the task's constructor and reports the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from ..task import Task

# name -> (module, class name, pip extra needed or None)
_BUILTIN = {
    "mnist-lenet": ("mnist", "MnistLeNetTask", None),
    "cifar10-resnet": ("cifar", "Cifar10ResNetTask", None),
    "bert-mlm": ("bert", "BertMlmTask", "bert"),
}


def _task_class(name: str) -> type[Task]:
    module, cls, extra = _BUILTIN[name]
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as exc:
        if extra is None:
            raise
        raise ImportError(
            f"task {name!r} needs optional dependencies ({exc}); install them with "
            f"pip install 'largebatch[{extra}]'"
        ) from exc
    return getattr(mod, cls)


def _factory(name: str) -> Callable[..., Task]:
    def build(**options: Any) -> Task:
        return _task_class(name)(**options)

    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"Build the {name!r} task (options: see {_BUILTIN[name][1]})."
    return build


TASKS: dict[str, Callable[..., Task]] = {name: _factory(name) for name in _BUILTIN}


def task_options(name: str) -> list[str]:
    """The option names a built-in task accepts."""
    params = inspect.signature(_task_class(name).__init__).parameters
    return [p for p in params if p != "self"]


def get_task(name: str, **options: Any) -> Task:
    """Build the task called ``name`` with keyword ``options``.

    Raises:
        ValueError: the name is unknown (the message lists the valid names), or an option is
            not accepted by the task (the message lists its valid options).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    if name in _BUILTIN:
        valid = task_options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for task {name!r}; valid options: {', '.join(valid)}"
            )
    return TASKS[name](**options)


__all__ = ["TASKS", "get_task", "task_options"]
