"""The built-in word list: common lower-case English words used as filler, keys and list items.

No external data is read; :class:`rtpurbo_vllm.eval.tasks.TaskGenerator` keeps only the words the
served model's tokenizer round-trips (``vocab="builtin"``).
"""

from __future__ import annotations

BUILTIN_WORDS: tuple[str, ...] = tuple("""
able about above accept across act actor add address admit adult affect after again against age agency
agent agree ahead air allow almost alone along already also always amount ancient anger angle animal
another answer anyone apart appear apple apply area argue arm army around arrive art article artist ask
attack attend author autumn avoid away baby back bag ball band bank bar base basic basket battle beach
bear beat beautiful bed bedroom before begin behind believe bell belong below belt bench beside best
better between beyond bicycle big bird birth bitter black blade blanket blind block blood blow blue
board boat body bone book border borrow boss bottle bottom bowl box boy brain branch brave bread break
breakfast breath brick bridge brief bright bring broad brother brown brush build burn bus business busy
butter button buy cabin cable cake call calm camera camp canal candle cap captain car card care career
carpet carry case castle cat catch cattle cause ceiling cell center chain chair chalk chance change
channel chapter charge cheap check cheese chest chicken chief child choice choose church circle city
claim class clean clear clerk clever climb clock close cloth cloud club coach coal coast coat coffee coin
cold collar collect college color column comb come comfort common company compare complete concert
connect contain cook cool copper copy corn corner cost cottage cotton cough count country couple courage
course court cousin cover cow crack craft crash cream create crew crime crop cross crowd crown cry cup
curtain curve cushion custom cut daily damage dance danger dark daughter dawn day dead deal dear debate
decide deep deer degree delay deliver depend depth desert design desk detail develop diamond dinner
direct dirt discover dish distance divide doctor dog dollar door double doubt down dozen draft dragon
drama draw drawer dream dress drink drive drop drum dry duck dust duty eager eagle early earn earth east
easy eat edge effort egg eight elbow elder electric elephant empty end enemy energy engine enjoy enough
enter entire equal escape evening event exact example exchange excite exercise exist expect expert
explain extra eye face fact factory fade fail fair faith fall false family famous fancy farm farmer fast
father fault favor fear feather feed feel fence festival fever field fight figure fill film final find
fine finger finish fire firm fish fit five flag flame flat flavor fleet flight float floor flour flower
fly fog fold follow food foot force forest forget fork form fortune forward fountain four fox frame free
fresh friend frog front frost fruit fuel full fun funny future gain game garage garden gate gather
general gentle giant gift girl give glad glass glove goat gold good govern grain grand grape grass grave
gray great green grey ground group grow guard guess guest guide guitar habit hair half hall hammer hand
handle happen happy harbor hard harvest hat hate head health heart heat heavy height hello help herb
hero hide high hill hire history hobby hold hole holiday hollow home honest honey hook hope horse
hospital host hot hotel hour house huge human humor hunger hunt hurry ice idea image imagine inch
include increase indeed index inform inside insect invite iron island item jacket jam jar jewel job join
joke journey joy judge juice jump jungle just keen kettle kind king kitchen kite knee knife knock know
label labor ladder lady lake lamp land language large last late laugh lawn layer lazy lead leaf learn
leather leave left leg lemon lend length lesson letter level library lift light limit line lion lip
liquid list listen little live load local lock long look loose lose loud love low luck lunch machine
magic mail main major make manage manner map marble march mark market marry master match material
matter meadow meal measure meat medal meet melt member memory mention menu merry message metal middle
milk mill mind mine minute mirror miss mist mix model modern moment money monkey month moon morning
mother motion motor mountain mouse mouth move movie music nail name narrow nation nature near neat neck
need needle nerve nest net never new news next nice night nine noble noise normal north nose note notice
novel number nurse oak object ocean offer office often oil old onion open orange order organ other
outside oven owner pack page paint pair palace pale panel paper parade parent park part party pass past
path patient pattern pause peace peach pear pen pencil people pepper perfect period person pet phone
photo piano pick picture piece pig pillow pilot pine pink pipe place plain plan plane planet plant
plate play please plenty pocket poem poet point polite pond pool poor popular port position possible
post pot potato pound powder power practice praise prepare present press pretty price pride prince
print prison prize problem produce program promise proof proper protect proud provide public pull pump
pupil purple purpose push puzzle quarter queen question quick quiet quilt rabbit race radio rail rain
raise range rapid rare rate raw reach read ready reason record red reflect refuse region relax remain
remember remove repair repeat reply report rest result return reward rhythm rice rich ride right ring
rise river road robin rock roof room root rope rose rough round route row royal rubber rule run rush
sad saddle safe sail salad salt same sand save saw scale scene school science score sea search season
seat second secret seed seek sell send sense serve settle seven shade shadow shake shape share sharp
sheep sheet shelf shell shelter shine ship shirt shoe shop shore short shoulder shout show side sign
silent silk silver simple sing sister sit six size skill skin skirt sky sleep slice slide slow small
smell smile smoke smooth snake snow soap soft soil soldier solid solve song soon sort sound soup south
space spare speak special speed spell spend spice spider spirit spoon sport spot spread spring square
stage stair stamp stand star start station stay steam steel step stick still stone stop store storm
story stove straight strange straw stream street strong student study style sudden sugar suit summer
sun supper supply sure surface surprise swamp sweet swim table tail take tale talk tall taste tea teach
team tear tell temple ten tent test thank theory thick thin thing think third thread three throat throw
thumb ticket tide tidy tiger timber time tiny title toast today together tomato tongue tool tooth top
total touch tour towel tower town toy track trade train travel tray treasure tree trial trick trip
truck true trunk trust truth try tube tune tunnel turn twelve twin type uncle under unit upper useful
usual valley van vase vessel view village violin visit voice vote wagon wait walk wall want warm wash
watch water wave wax way wealth weather weave wedding week weight welcome west wheat wheel whisper
whistle white whole wide wife wild win wind window wine wing winter wire wise wish wolf wonder wood wool
word work world worry write yard year yellow young youth zebra zero zone
""".split())
