"""One-off migration: rewrite absltest / parameterized / chex.TestCase test files as plain pytest.

Used once for the suite's "one pytest style" (issue 25); kept so that a branch that still
adds absltest-style tests can be converted the same way after a merge, then deleted.

    pip install libcst
    python scripts/absl_to_pytest.py tests/test_x.py ...
    ruff check --fix --unsafe-fixes --select F401,I tests/test_x.py && ruff format tests/test_x.py

What it does, mechanically: a TestCase class loses its base and gets a ``Test`` prefix
(``FooTest`` -> ``TestFoo``); ``setUp`` -> ``setup_method``; ``parameterized.parameters /
named_parameters / product`` -> ``pytest.mark.parametrize`` (names become ids);
``chex.variants(with_jit=True, without_jit=True)`` + ``self.variant`` -> the ``variant``
fixture of tests/conftest.py; ``self.assertX(...)`` -> ``assert``; ``assertRaises(Regex)``
-> ``pytest.raises(..., match=)``. Comments inside the decorators are kept. Anything it does
not know (``subTest``, a non-context ``assertRaises``) stops it or is left for a hand edit.
"""

import re
import sys

import libcst as cst
import libcst.matchers as m

TESTCASE_BASES = {"chex.TestCase", "parameterized.TestCase", "absltest.TestCase"}


def dotted(node):
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{dotted(node.value)}.{node.attr.value}"
    return None


def par(e):
    """Parenthesize an operand of a comparison / not when needed."""
    if isinstance(
        e, (cst.Comparison, cst.BooleanOperation, cst.IfExp, cst.Lambda, cst.NamedExpr)
    ) or (isinstance(e, cst.UnaryOperation) and isinstance(e.operator, cst.Not)):
        if not e.lpar:
            return e.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
    return e


def strip_ws(e):
    return e


def cmp(a, op, b):
    return cst.Comparison(
        left=par(a), comparisons=[cst.ComparisonTarget(operator=op, comparator=par(b))]
    )


def expr(src):
    return cst.parse_expression(src)


class Conv(cst.CSTTransformer):
    def __init__(self):
        self.renames = {}
        self.need_re = False
        self.fn_params = []

    # --- classes ---------------------------------------------------------------------
    def leave_ClassDef(self, orig, node):
        bases = [b for b in node.bases if dotted(b.value) not in TESTCASE_BASES]
        if len(bases) == len(node.bases):
            return node
        name = node.name.value
        new = name
        if not name.startswith("Test"):
            new = "Test" + (name[:-4] if name.endswith("Test") else name)
        self.renames[name] = new
        return (
            node.with_changes(
                name=cst.Name(new),
                bases=bases,
                lpar=cst.MaybeSentinel.DEFAULT if bases else cst.MaybeSentinel.DEFAULT,
                rpar=cst.MaybeSentinel.DEFAULT,
            )
            if bases
            else node.with_changes(
                name=cst.Name(new),
                bases=[],
                lpar=cst.MaybeSentinel.DEFAULT,
                rpar=cst.MaybeSentinel.DEFAULT,
            )
        )

    # --- functions -------------------------------------------------------------------
    def leave_FunctionDef(self, orig, node):
        if node.name.value == "setUp":
            node = node.with_changes(name=cst.Name("setup_method"))
            body = [
                s
                for s in node.body.body
                if not m.matches(
                    s,
                    m.SimpleStatementLine(
                        body=[
                            m.Expr(
                                m.Call(
                                    func=m.Attribute(
                                        value=m.Call(func=m.Name("super")), attr=m.Name("setUp")
                                    )
                                )
                            )
                        ]
                    ),
                )
            ]
            node = node.with_changes(body=node.body.with_changes(body=body))
        params = [p.name.value for p in node.params.params]
        if params and params[0] == "self":
            params = params[1:]
        decos = []
        add_variant = False
        for d in node.decorators:
            dec = d.decorator
            name = dotted(dec.func) if isinstance(dec, cst.Call) else dotted(dec)
            if name == "chex.variants":
                kws = {a.keyword.value: a.value.value for a in dec.args}
                assert kws == {"with_jit": "True", "without_jit": "True"}, kws
                add_variant = True
                continue
            if name == "parameterized.named_parameters":
                decos.append(d.with_changes(decorator=self.named(dec, params)))
                continue
            if name == "parameterized.parameters":
                decos.append(d.with_changes(decorator=self.parameters(dec, params)))
                continue
            if name == "parameterized.product":
                for a in dec.args:
                    decos.append(
                        d.with_changes(
                            decorator=cst.Call(
                                func=expr("pytest.mark.parametrize"),
                                args=[
                                    cst.Arg(cst.SimpleString(f'"{a.keyword.value}"')),
                                    cst.Arg(a.value),
                                ],
                            )
                        )
                    )
                continue
            decos.append(d)
        node = node.with_changes(decorators=decos)
        if add_variant:
            ps = list(node.params.params)
            ps.insert(1, cst.Param(cst.Name("variant")))
            node = node.with_changes(params=node.params.with_changes(params=ps))
        return node

    def _argnames(self, params, n):
        names = params[:n]
        assert len(names) == n, (params, n)
        return cst.SimpleString('"' + ",".join(names) + '"')

    def named(self, dec, params):
        args = dec.args
        if len(args) == 1 and args[0].star == "*":
            v = args[0].value
            # *[(x, x) for x in X]  ->  parametrize("p", X)
            if (
                isinstance(v, cst.ListComp)
                and isinstance(v.elt, cst.Tuple)
                and len(v.elt.elements) == 2
                and all(m.matches(e.value, m.Name(v.for_in.target.value)) for e in v.elt.elements)
            ):
                return cst.Call(
                    func=expr("pytest.mark.parametrize"),
                    args=[cst.Arg(self._argnames(params, 1)), cst.Arg(v.for_in.iter)],
                )
            raise ValueError(f"starred named_parameters: {cst.Module([]).code_for_node(v)}")
        if (
            len(args) == 1
            and not isinstance(args[0].value, cst.Tuple)
            and dotted(getattr(args[0].value, "func", None)) != "dict"
        ):
            return cst.Call(
                func=expr("pytest.mark.parametrize"),
                args=[
                    cst.Arg(self._argnames(params, len(params))),
                    cst.Arg(
                        expr("[pytest.param(*c[1:], id=c[0]) for c in X]").with_changes(
                            for_in=expr("[0 for c in X]").for_in.with_changes(iter=args[0].value)
                        )
                    ),
                ],
            )
        cases = []
        nargs = None
        for a in args:
            v = a.value
            if isinstance(v, cst.Tuple):
                els = [e.value for e in v.elements]
                name, vals = els[0], els[1:]
                pargs = [cst.Arg(x) for x in vals]
            elif isinstance(v, cst.Call) and dotted(v.func) == "dict":
                kw = {x.keyword.value: x.value for x in v.args}
                name = kw.pop("testcase_name")
                vals = [kw[p] for p in params if p in kw]
                assert len(vals) == len(kw), (params, list(kw))
                pargs = [cst.Arg(x) for x in vals]
            else:
                raise ValueError(cst.Module([]).code_for_node(v))
            assert nargs in (None, len(vals))
            nargs = len(vals)
            cases.append(
                cst.Element(
                    cst.Call(
                        func=expr("pytest.param"),
                        args=pargs
                        + [
                            cst.Arg(
                                name,
                                keyword=cst.Name("id"),
                                equal=cst.AssignEqual(
                                    cst.SimpleWhitespace(""), cst.SimpleWhitespace("")
                                ),
                            )
                        ],
                    ),
                    comma=a.comma,
                )
            )
        return cst.Call(
            func=expr("pytest.mark.parametrize"),
            args=[
                cst.Arg(self._argnames(params, nargs)),
                cst.Arg(
                    cst.List(
                        cases,
                        lbracket=cst.LeftSquareBracket(whitespace_after=dec.whitespace_before_args),
                    )
                ),
            ],
        )

    def parameters(self, dec, params):
        args = dec.args
        if len(args) == 1 and args[0].star == "*":
            n = len(params)
            return cst.Call(
                func=expr("pytest.mark.parametrize"),
                args=[cst.Arg(self._argnames(params, 1 if n == 1 else n)), cst.Arg(args[0].value)],
            )
        if len(args) == 1 and isinstance(args[0].value, (cst.List, cst.Tuple)) and len(params) == 1:
            pass
        cases = []
        nargs = None
        for a in args:
            v = a.value
            if a.star == "*":
                cases.append(cst.StarredElement(v, comma=a.comma))
                continue
            if isinstance(v, cst.Tuple):
                k = len(v.elements)
                cases.append(cst.Element(v.elements[0].value if k == 1 else v, comma=a.comma))
            elif isinstance(v, cst.Call) and dotted(v.func) == "dict":
                raise ValueError("dict parameters")
            else:
                k = 1
                cases.append(cst.Element(v, comma=a.comma))
            assert nargs in (None, k), cst.Module([]).code_for_node(dec)
            nargs = k
        return cst.Call(
            func=expr("pytest.mark.parametrize"),
            args=[
                cst.Arg(self._argnames(params, nargs)),
                cst.Arg(
                    cst.List(
                        cases,
                        lbracket=cst.LeftSquareBracket(whitespace_after=dec.whitespace_before_args),
                    )
                ),
            ],
        )

    # --- self.variant ------------------------------------------------------------------
    def leave_Attribute(self, orig, node):
        if m.matches(node, m.Attribute(value=m.Name("self"), attr=m.Name("variant"))):
            return cst.Name("variant")
        return node

    # --- assertions --------------------------------------------------------------------
    def leave_Expr(self, orig, node):
        c = node.value
        if not (isinstance(c, cst.Call) and m.matches(c.func, m.Attribute(value=m.Name("self")))):
            return node
        meth = c.func.attr.value
        pos = [a.value for a in c.args if a.keyword is None and not a.star]
        kw = {a.keyword.value: a.value for a in c.args if a.keyword is not None}
        msg = kw.pop("msg", None)
        assert not kw, (meth, kw)
        if meth == "skipTest":
            return node.with_changes(value=cst.Call(func=expr("pytest.skip"), args=c.args))
        if meth in ("assertRaises", "assertRaisesRegex"):
            raise ValueError("non-context assertRaises")
        two = {
            "assertEqual": cst.Equal(),
            "assertNotEqual": cst.NotEqual(),
            "assertIn": cst.In(),
            "assertNotIn": cst.NotIn(),
            "assertGreater": cst.GreaterThan(),
            "assertGreaterEqual": cst.GreaterThanEqual(),
            "assertLess": cst.LessThan(),
            "assertLessEqual": cst.LessThanEqual(),
            "assertIs": cst.Is(),
            "assertIsNot": cst.IsNot(),
        }
        if meth in two:
            if len(pos) == 3:
                msg = pos.pop()
            a, b = pos
            test = cmp(a, two[meth], b)
        elif meth == "assertTrue":
            if len(pos) == 2:
                msg = pos.pop()
            (test,) = pos
        elif meth == "assertFalse":
            if len(pos) == 2:
                msg = pos.pop()
            test = cst.UnaryOperation(operator=cst.Not(), expression=par(pos[0]))
        elif meth in ("assertIsNone", "assertIsNotNone"):
            if len(pos) == 2:
                msg = pos.pop()
            test = cmp(
                pos[0], cst.Is() if meth == "assertIsNone" else cst.IsNot(), cst.Name("None")
            )
        elif meth == "assertIsInstance":
            if len(pos) == 3:
                msg = pos.pop()
            test = cst.Call(func=cst.Name("isinstance"), args=[cst.Arg(pos[0]), cst.Arg(pos[1])])
        elif meth == "assertLen":
            if len(pos) == 3:
                msg = pos.pop()
            test = cmp(cst.Call(func=cst.Name("len"), args=[cst.Arg(pos[0])]), cst.Equal(), pos[1])
        elif meth in ("assertRegex", "assertNotRegex"):
            if len(pos) == 3:
                msg = pos.pop()
            self.need_re = True
            test = cst.Call(func=expr("re.search"), args=[cst.Arg(pos[1]), cst.Arg(pos[0])])
            if meth == "assertNotRegex":
                test = cst.UnaryOperation(operator=cst.Not(), expression=test)
        else:
            if meth.startswith("assert"):
                raise ValueError(meth)
            return node
        return cst.Assert(test=test, msg=msg)

    def leave_WithItem(self, orig, node):
        c = node.item
        if not (isinstance(c, cst.Call) and m.matches(c.func, m.Attribute(value=m.Name("self")))):
            return node
        meth = c.func.attr.value
        if meth == "assertRaisesRegex":
            e, r = [a.value for a in c.args]
            return node.with_changes(
                item=cst.Call(
                    func=expr("pytest.raises"),
                    args=[
                        cst.Arg(e),
                        cst.Arg(
                            r,
                            keyword=cst.Name("match"),
                            equal=cst.AssignEqual(
                                cst.SimpleWhitespace(""), cst.SimpleWhitespace("")
                            ),
                        ),
                    ],
                )
            )
        if meth == "assertRaises":
            return node.with_changes(item=cst.Call(func=expr("pytest.raises"), args=c.args))
        return node

    # --- module --------------------------------------------------------------------------
    def leave_If(self, orig, node):
        return node

    def leave_SimpleStatementLine(self, orig, node):
        if m.matches(
            node,
            m.SimpleStatementLine(
                body=[
                    m.ImportFrom(module=m.Attribute(value=m.Name("absl"), attr=m.Name("testing")))
                ]
            ),
        ):
            return cst.RemoveFromParent()
        return node


def convert(path):
    src = open(path).read()
    mod = cst.parse_module(src)
    t = Conv()
    mod = mod.visit(t)
    body = []
    for s in mod.body:
        if isinstance(s, cst.If) and m.matches(s.test, m.Comparison(left=m.Name("__name__"))):
            continue
        body.append(s)
    mod = mod.with_changes(body=body)
    code = mod.code
    for old, new in t.renames.items():
        code = re.sub(rf"\b{old}\b", new, code)
    imports = []
    if "import pytest\n" not in code:
        imports.append("import pytest\n")
    if t.need_re and "import re\n" not in code:
        imports.append("import re\n")
    if imports:
        # after the module docstring / first import line
        i = code.index("\nimport ") + 1
        code = code[:i] + "".join(imports) + code[i:]
    open(path, "w").write(code)
    print(path, t.renames)


for p in sys.argv[1:]:
    convert(p)
