"""A small StableHLO text parser for the lowering tests: functions, platform cases and their
branches (tests/ops/test_int8_dot.py, tests/test_lowering.py)."""

import re

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\((.*?)\)\s*->", re.S)


def _block_end(text, i):
    """Index just past the `{...}` block that opens at text[i] == '{'."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced braces")


def _functions(module: str) -> dict[str, tuple[str, str]]:
    """name -> (signature, body) for every func.func in the module."""
    out = {}
    for m in _FUNC.finditer(module):
        i = module.index("{", m.end())
        # skip attribute dicts of the result types: the body starts at a line end
        while module[i + 1] != "\n":
            i = module.index("{", _block_end(module, i))
        out[m.group(1)] = (m.group(2), module[i : _block_end(module, i)])
    return out


def _cases(body: str):
    """Top-level `stablehlo.case` ops: (result name, selector, [branch texts], span)."""
    out = []
    for m in re.finditer(r'(%[\w#]+) = "stablehlo\.case"\((%[\w#]+)\) \(', body):
        i, branches = m.end(), []
        while body[i] == "{":
            end = _block_end(body, i)
            branches.append(body[i:end])
            i = end
            if body.startswith(", ", i):
                i += 2
        out.append((m.group(1), m.group(2), branches, (m.start(), i)))
    return out


def platform_views(module: str, platforms) -> dict[str, str]:
    """For each platform, the code it runs: every platform case replaced by its branch.

    A multi-platform export takes the platform index as an argument marked
    ``jax.global_constant = "_platform_index"``. A case on it returns, per
    platform, a constant that selects the branch of the case on the real
    computation (platforms that share a lowering share a branch). Called
    private functions are inlined into the view (as text) so nothing hides there.
    """
    funcs = _functions(module)
    consts = dict(
        re.findall(r"(%[\w#]+) = stablehlo\.constant dense<(-?\d+)> : tensor<i32>", module)
    )
    views = {}
    for p_index, platform in enumerate(platforms):

        def view(name, seen, p_index=p_index):
            sig, body = funcs[name]
            pidx = re.findall(
                r'(%arg\d+): tensor<i32> \{jax\.global_constant = "_platform_index"\}', sig
            )
            selected = {}  # case result name -> branch index for this platform
            pieces, last = [], 0
            for res, sel, branches, (a, b) in _cases(body):
                if pidx and sel == pidx[0]:
                    k = p_index
                elif sel in selected:
                    k = selected[sel]
                else:
                    continue
                branch = branches[min(k, len(branches) - 1)] if len(branches) > 1 else branches[0]
                ret = re.search(r"stablehlo\.return (%[\w#]+)", branch)
                if ret and ret.group(1) in consts and "dot_general" not in branch:
                    selected[res] = int(consts[ret.group(1)])
                pieces.append(body[last:a] + branch)
                last = b
            text = "".join(pieces) + body[last:]
            for callee in set(re.findall(r"call @([\w.$-]+)", text)) - seen:
                text += view(callee, seen | {callee}, p_index)
            return text

        views[platform] = view("main", {"main"})
    return views
